"""`make demo`: the gateway in front of the fake OpenAI server, one chat and one stream through the SDK.

No OpenAI key needed; everything runs on 127.0.0.1 and stops when the demo ends.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import openai

from app.config import Settings
from app.db.migrate import upgrade
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway


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
        finally:
            gateway.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
