"""Uploads that cost money (audio transcriptions, image edits) hold their worst case against a key's budget
before they go upstream, read from their multipart form, as the other routes' calls do: many at once
against a cap worth three holds spend at most the cap, the refused ones never reach the upstream, an
admitted one settles to what its usage says, and a body that is no form is refused with a 400 that
changes nothing."""

from __future__ import annotations

import concurrent.futures
import hashlib
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import sdk_client
from tests.db import fetch
from tests.fakes.openai_upstream import FakeOpenAI
from tests.gateway.test_keys import create_key
from tests.harness import MASTER_KEY, GatewayProcess, ThreadedGateway, wait_until
from tests.security import raw_request

MASTER = {"authorization": f"Bearer {MASTER_KEY}"}
# 750 bytes: at most one second of audio (6 kb/s), 17 audio tokens; the fake bills 10 for it.
AUDIO = bytes(range(250)) * 3
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(1000)
# The transcript's default output cap for the model, from GATEWAY_CONFIG: 20 tokens held; the fake bills 11.
CONFIG = "limits: {default_max_output_tokens_by_model: {gpt-4o-transcribe: 20}}\n"
# gpt-4o-transcribe, per 1M tokens: $6 audio input, $10 output.
TRANSCRIPTION_HOLD = Decimal(17 * 6 + 20 * 10) / 10**6
TRANSCRIPTION_COST = Decimal(10 * 6 + 11 * 10) / 10**6
# gpt-image-1, per 1M tokens: $5 text input, $10 image input, $40 output. The prompt "make it blue" is
# estimated at 3 tokens, the input image held at 3,800 (the fake bills 135), a high-quality 1024x1536
# image is 6,240 tokens out.
EDIT_HOLD = Decimal(3 * 5 + 3800 * 10 + 6240 * 40) / 10**6
EDIT_COST = Decimal(3 * 5 + 135 * 10 + 6240 * 40) / 10**6


def transcribe(sdk: openai.OpenAI, model: str = "gpt-4o-transcribe") -> Any:
    return sdk.audio.transcriptions.create(model=model, file=("talk.mp3", AUDIO, "audio/mpeg"))


def edit(sdk: openai.OpenAI) -> Any:
    return sdk.images.edit(
        model="gpt-image-1",
        image=("cat.png", IMAGE, "image/png"),
        prompt="make it blue",
        quality="high",
        size="1024x1536",
    )


# Each upload, what it holds and what the fake makes it cost.
UPLOADS: dict[str, tuple[str, Callable[[openai.OpenAI], Any], Decimal, Decimal]] = {
    "transcription": ("/v1/audio/transcriptions", transcribe, TRANSCRIPTION_HOLD, TRANSCRIPTION_COST),
    "image edit": ("/v1/images/edits", edit, EDIT_HOLD, EDIT_COST),
}


def budget_row(url: str, key_id: str) -> dict[str, str]:
    rows = httpx.get(url + "/admin/budgets", headers=MASTER).json()["data"]
    found = (r for r in rows if (r["scope"], r["period"]) == (f"key:{key_id}", "day"))
    return next(found, {"spent_usd": "0", "reserved_usd": "0"})


def rows_of(database_url: str, key_id: str) -> list[dict[str, Any]]:
    return fetch(
        database_url,
        "SELECT endpoint, model, cost_usd, reserved_usd FROM usage_events WHERE api_key_id = $1",
        key_id,
    )


@pytest.fixture(scope="module")
def slow() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.mark.parametrize("upload", list(UPLOADS))
def test_concurrent_uploads_spend_at_most_the_cap(
    upload: str, slow: FakeOpenAI, database_url: str, tmp_path: Path
) -> None:
    path, call, hold, cost = UPLOADS[upload]
    # Worth three holds, not four; twenty calls at their real cost would spend several times as much.
    cap = (hold * 7 / 2).quantize(Decimal("1e-6"))
    assert 20 * cost > cap
    slow.reset()
    # Each answer takes a while, so the calls are all in flight together.
    slow.slow_first_byte(0.5, times=20)
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    gateway = GatewayProcess(slow, database_url, tmp_path, env={"GATEWAY_CONFIG": str(config)}).start()
    try:
        created = httpx.post(
            gateway.url + "/admin/keys",
            json={"name": f"uploads-{uuid.uuid4().hex[:6]}", "budget_daily_usd": str(cap)},
            headers=MASTER,
        )
        key = created.json()
        with sdk_client(gateway.url + "/v1", api_key=key["secret"], timeout=30) as sdk:

            def one(_: int) -> int:
                try:
                    call(sdk)
                except openai.RateLimitError as exc:
                    assert exc.code == "budget_exceeded", exc.message
                    return 429
                return 200

            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                statuses = list(pool.map(one, range(20)))
        admitted = statuses.count(200)
        print(f"{upload}: {admitted} of 20 admitted under a ${cap} cap")
        assert admitted == 3
        # The refused calls never reached the upstream.
        assert [r.path for r in slow.requests] == [path] * admitted
        wait_until(lambda: len(rows_of(database_url, key["id"])) == admitted, timeout=15)
        rows = rows_of(database_url, key["id"])
        assert all(Decimal(str(r["cost_usd"])) == cost <= Decimal(str(r["reserved_usd"])) for r in rows), rows
        spent = admitted * cost
        assert spent <= cap
        wait_until(lambda: Decimal(budget_row(gateway.url, key["id"])["reserved_usd"]) == 0)
        assert Decimal(budget_row(gateway.url, key["id"])["spent_usd"]) == spent
    finally:
        gateway.stop()


@pytest.mark.parametrize("upload", list(UPLOADS))
def test_an_admitted_upload_settles_to_its_usage(
    upload: str,
    start_gateway: Callable[..., ThreadedGateway],
    fake: FakeOpenAI,
    database_url: str,
    tmp_path: Path,
) -> None:
    path, call, hold, cost = UPLOADS[upload]
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    gateway = start_gateway(config_file=config)
    # One hold fits; once the call has cost what it did, another does not.
    key = create_key(gateway, budget_daily_usd=str(hold + cost / 2))
    with sdk_client(gateway.base_url, api_key=key["secret"]) as sdk:
        answered = call(sdk)
    assert answered.usage is not None
    (seen,) = fake.requests
    # The upload went upstream as it came.
    sent = AUDIO if upload == "transcription" else IMAGE
    assert seen.path == path and seen.upload_sha256 == hashlib.sha256(sent).hexdigest()
    wait_until(lambda: len(rows_of(database_url, key["id"])) == 1)
    (row,) = rows_of(database_url, key["id"])
    assert row["endpoint"] == path
    assert Decimal(str(row["cost_usd"])) == cost and Decimal(str(row["reserved_usd"])) == hold
    wait_until(lambda: Decimal(budget_row(gateway.url, key["id"])["reserved_usd"]) == 0)
    assert Decimal(budget_row(gateway.url, key["id"])["spent_usd"]) == cost
    # What is left of the budget is less than another hold: refused before it goes upstream.
    with (
        sdk_client(gateway.base_url, api_key=key["secret"]) as sdk,
        pytest.raises(openai.RateLimitError) as e,
    ):
        call(sdk)
    assert e.value.code == "budget_exceeded"
    assert len(fake.requests) == 1


def test_an_unpriced_model_holds_nothing(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    # whisper-1 is priced by the minute, which the price table does not hold: as any unpriced call, it
    # reserves nothing and is refused only by a budget already spent.
    key = create_key(gateway, budget_daily_usd="0.000001")
    with sdk_client(gateway.base_url, api_key=key["secret"]) as sdk:
        assert transcribe(sdk, model="whisper-1").text
    assert [r.path for r in fake.requests] == ["/v1/audio/transcriptions"]
    assert Decimal(budget_row(gateway.url, key["id"])["reserved_usd"]) == 0


BOUNDARY = "b0undary"
GOOD = (
    (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-transcribe\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n\r\n'
    ).encode()
    + AUDIO
    + f"\r\n--{BOUNDARY}--\r\n".encode()
)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (f"multipart/form-data; boundary={BOUNDARY}", b"not a form at all"),
        (f"multipart/form-data; boundary={BOUNDARY}", GOOD[:-20]),  # cut before its closing boundary
        (f"multipart/form-data; boundary={BOUNDARY}", b""),
        (f"multipart/form-data; boundary={BOUNDARY}", GOOD.replace(b"form-data; name", b"attachment; name")),
        ("multipart/form-data", GOOD),  # no boundary
        ("application/json", b'{"model": "gpt-4o-transcribe"}'),
    ],
    ids=["garbage", "truncated", "empty", "no-form-data-part", "no-boundary", "json"],
)
def test_a_malformed_upload_is_refused_and_changes_nothing(
    content_type: str, body: bytes, gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    key = create_key(gateway, budget_daily_usd="1")
    headers = {"authorization": f"Bearer {key['secret']}", "content-type": content_type}
    for path in ("/v1/audio/transcriptions", "/v1/images/edits"):
        refused = raw_request(gateway.port, "POST", path, headers=headers, body=body)
        assert refused.status == 400, refused.body
        error = refused.json()["error"]
        assert isinstance(error, dict) and error["type"] == "invalid_request_error", error
    assert fake.requests == []
    row = budget_row(gateway.url, key["id"])
    assert Decimal(row["reserved_usd"]) == Decimal(row["spent_usd"]) == 0
    # The well-formed body is served: only the bad ones were refused.
    headers["content-type"] = f"multipart/form-data; boundary={BOUNDARY}"
    assert (
        raw_request(gateway.port, "POST", "/v1/audio/transcriptions", headers=headers, body=GOOD).status
        == 200
    )
    wait_until(lambda: len(rows_of(database_url, key["id"])) == 1)
    assert [r["endpoint"] for r in rows_of(database_url, key["id"])] == ["/v1/audio/transcriptions"]
