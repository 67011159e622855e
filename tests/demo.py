"""`make demo`: the gateway in front of the fake OpenAI server, one chat and one stream through the SDK,
then the rows the gateway recorded for them and the usage report.

No OpenAI key needed; everything runs on 127.0.0.1 and stops when the demo ends.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from decimal import Decimal
from pathlib import Path

import httpx
import openai
from sqlalchemy import select

from app.config import Settings
from app.db.engine import create_engine
from app.db.migrate import upgrade
from app.db.models import usage_events
from app.money import usd
from app.reports.usage import to_plain_table, to_table
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway, wait_until


def main() -> None:
    with FakeOpenAI() as fake, tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(
            master_key=MASTER_KEY,
            openai_api_key=fake.api_key,
            openai_base_url=fake.base_url,
            data_dir=Path(data_dir),
            log_level="warning",
        )
        upgrade(settings.database_url, settings.data_dir)
        gateway = ThreadedGateway(settings).start()
        try:
            print(f"gateway on {gateway.base_url}, fake OpenAI upstream on {fake.base_url}\n")
            client = openai.OpenAI(
                base_url=gateway.base_url,
                api_key=MASTER_KEY,
                default_headers={"X-Feature": "demo", "X-User-Id": "newcomer"},
            )
            fake.reply("Hello! I answered through the gateway.")
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}]
            )
            reply = raw.parse()
            print("chat:   ", reply.choices[0].message.content)
            print("         usage:", reply.usage.model_dump(exclude_none=True) if reply.usage else None)
            print(
                "         X-Request-Id:",
                raw.headers["x-request-id"],
                " attempts:",
                raw.headers["x-gateway-attempts"],
            )
            fake.reply("Streams arrive event by event, as the upstream sends them.")
            print("stream: ", end="")
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Stream something"}], stream=True
            )
            for chunk in stream:
                print(chunk.choices[0].delta.content or "", end="|", flush=True)
            print("\n\nThe upstream received only its own key and no gateway headers:")
            print(
                "        ",
                {k: v for k, v in fake.requests[-1].headers.items() if k in ("authorization", "x-feature")},
            )
            show_what_was_recorded(gateway, settings, expected=2)
        finally:
            gateway.stop()
    print(NEXT_STEPS)
    sys.exit(0)


ROW_COLUMNS = (
    "endpoint",
    "stream",
    "feature",
    "user_id",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
)


def show_what_was_recorded(gateway: ThreadedGateway, settings: Settings, expected: int) -> None:
    """The point of the gateway: every call became a row, attributed and priced, and the report sums them.
    The rows are written in the background a moment after each call, so they are waited for."""

    async def rows() -> list[dict[str, object]]:
        engine = create_engine(settings.database_url, settings.data_dir)
        try:
            async with engine.connect() as conn:
                found = await conn.execute(select(usage_events).order_by(usage_events.c.id))
                return [dict(row) for row in found.mappings()]
        finally:
            await engine.dispose()

    def all_written() -> list[dict[str, object]] | None:
        found = asyncio.run(rows())
        return found if len(found) >= expected else None

    recorded: list[dict[str, object]] = wait_until(all_written, timeout=30, interval=0.1)
    shown = [
        {**{name: row[name] for name in ROW_COLUMNS}, "cost_usd": usd(Decimal(str(row["cost_usd"])))}
        for row in recorded
    ]
    print("\nWhat the gateway recorded, a row of usage_events per call:\n")
    print(to_plain_table(shown, ROW_COLUMNS))
    report = httpx.get(
        gateway.url + "/v1/usage",
        params={"group_by": "feature,user"},
        headers={"authorization": f"Bearer {MASTER_KEY}"},
        timeout=10,
    )
    report.raise_for_status()
    print(
        "\nThe usage report (GET /v1/usage?group_by=feature,user; `llm-gateway usage --by feature,user`):\n"
    )
    print(to_table(report.json()["data"], ("feature", "user")))


NEXT_STEPS = """
Where to look next:
  - Your own gateway: `make run` (needs OPENAI_API_KEY), then point the SDK at http://127.0.0.1:8080/v1
    and send X-Feature / X-User-Id (README, "Pointing the SDKs at it").
  - A key per calling service: `llm-gateway keys create NAME`, or POST /admin/keys (README, "Gateway keys").
  - Reports: `llm-gateway usage`, GET /v1/usage, the cost dashboard at /dashboard, and the SQL in the
    README's "Cost queries in SQL".
  - Limits and budgets per feature and user: GATEWAY_CONFIG (README, "Model policy, limits and budgets").
"""


if __name__ == "__main__":
    main()
