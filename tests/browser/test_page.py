"""A real browser (headless Chromium, driven by Playwright) runs a page served from another origin: the
page's backend mints a browser token with its gateway key, and the page streams a chat completion through
the gateway with the official `openai` npm package, bundled by esbuild (nothing from a CDN).

`make browser-deps` installs what this needs (Debian's chromium, the npm packages); the bundle is built
here, from tests/browser/src."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.db import usage_rows, wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.gateway.test_keys import create_key
from tests.harness import ThreadedGateway, free_port

HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", HERE.parents[1] / "var" / "test-artifacts"))


def _build_bundle() -> None:
    esbuild = HERE / "node_modules" / ".bin" / "esbuild"
    if not Path(CHROMIUM).exists() or not esbuild.exists() or not (HERE / "node_modules" / "openai").is_dir():
        pytest.fail("Chromium and tests/browser/node_modules are needed: `make browser-deps` installs them")
    subprocess.run(
        ["npm", "run", "--silent", "build"], cwd=HERE, check=True, capture_output=True, timeout=120
    )


class PageServer:
    """The product's web server on its own origin: the static page and its bundle, and POST /token, the
    backend side, which mints a browser token with the product's gateway key."""

    def __init__(self, mint: Callable[[], dict[str, Any]], port: int) -> None:
        self.port = port

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(HERE), **kwargs)

            def do_POST(self) -> None:
                body = httpx.Response(200, json=mint()).content
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium: Debian's, driven by Playwright (no browser download). Closed before the test
    reads the database: Playwright's sync API holds an event loop in this thread meanwhile."""
    _build_bundle()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def test_a_page_on_another_origin_streams_through_the_gateway(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, database_url: str
) -> None:
    allowed_port = free_port()
    allowed = f"http://127.0.0.1:{allowed_port}"
    gateway = start_gateway(cors_origins=(allowed,))
    key = create_key(gateway, default_feature="support-chat", scopes=["chat", "browser_tokens"])

    def mint() -> dict[str, Any]:
        # The backend side: its gateway key, the signed-in user, the page's origin.
        minted = httpx.post(
            gateway.base_url + "/browser_tokens",
            json={"user_id": "customer-7", "origins": [allowed], "models": ["gpt-4o-mini"], "ttl_s": 300},
            headers={"authorization": f"Bearer {key['secret']}"},
        )
        minted.raise_for_status()
        return {"token": minted.json()["token"], "baseURL": gateway.base_url}

    fake.reply(chunks=["Hello, ", "browser! ", "Streamed through the gateway."])
    with (
        PageServer(mint, allowed_port) as page_server,
        PageServer(mint, free_port()) as other,
        chromium() as browser,
    ):
        page = browser.new_page()
        request_id = f"browser-{uuid.uuid4().hex}"
        page.goto(f"{page_server.origin}/index.html#request_id={request_id}")
        page.wait_for_selector("body[data-state=done]", timeout=30_000)
        text = page.inner_text("#answer")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser-token-chat.png"))
        calls = len(fake.requests)

        # The same page from an origin not on the list: the browser refuses the preflight's answer, the
        # SDK raises a connection error, and nothing reaches the upstream.
        refused = browser.new_page()
        other_id = f"browser-{uuid.uuid4().hex}"
        refused.goto(f"{other.origin}/index.html#request_id={other_id}")
        refused.wait_for_selector("body[data-state=error]", timeout=30_000)
        refused.screenshot(path=str(ARTIFACTS / "browser-token-refused-origin.png"))
        refused_text, refused_status = refused.inner_text("#answer"), refused.inner_text("#status")

    assert text == "Hello, browser! Streamed through the gateway."
    (row,) = wait_for_rows(database_url, request_id)
    # The page sent X-Feature and X-User-Id of its own: the token's user and feature are billed.
    assert (row["user_id"], row["feature"]) == ("customer-7", "support-chat")
    assert row["api_key_id"] == key["id"] and row["browser_token_id"].startswith("btk_")
    assert row["stream"] is True and row["status_code"] == 200
    assert refused_text == ""
    assert "Connection error" in refused_status
    assert len(fake.requests) == calls
    assert usage_rows(database_url, other_id) == []
