// The official Node SDK reading a stream that the gateway keeps alive with SSE comments while the upstream
// is silent. Run by tests/gateway/test_sse_keepalive.py, which starts a gateway with a short keep-alive
// interval in front of a fake upstream that thinks longer than it, and passes GATEWAY_BASE_URL and
// GATEWAY_API_KEY (and EXPECT_ERROR when the upstream fails after the 200 went).
import assert from "node:assert/strict";
import { test } from "node:test";
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.GATEWAY_BASE_URL,
  apiKey: process.env.GATEWAY_API_KEY,
  maxRetries: 0,
});
const messages = [{ role: "user", content: "Think long, then say hello" }];

test("a kept-alive stream reads as any other", { skip: Boolean(process.env.EXPECT_ERROR) }, async () => {
  const stream = await client.chat.completions.create({ model: "gpt-4o-mini", messages, stream: true });
  let text = "";
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta?.content ?? "";
  }
  assert.ok(text.length > 0);
});

test("a failure after a keep-alive raises", { skip: !process.env.EXPECT_ERROR }, async () => {
  const stream = await client.chat.completions.create({ model: "gpt-4o-mini", messages, stream: true });
  await assert.rejects(
    async () => {
      for await (const _ of stream) {
        // nothing arrives before the error event
      }
    },
    (error) => error instanceof OpenAI.APIError,
  );
});
