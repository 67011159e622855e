// The patterns a JavaScript team writes with the official OpenAI Node SDK, pointed at the gateway.
// Run by tests/gateway/test_node_sdk.py, which starts the gateway and the fake upstream and passes
// GATEWAY_BASE_URL and GATEWAY_API_KEY.
import assert from "node:assert/strict";
import { test } from "node:test";
import OpenAI from "openai";
import { zodResponseFormat } from "openai/helpers/zod";
import { z } from "zod";

const client = new OpenAI({
  baseURL: process.env.GATEWAY_BASE_URL,
  apiKey: process.env.GATEWAY_API_KEY,
  maxRetries: 0,
  defaultHeaders: { "X-Feature": "node-sdk" },
});
const messages = [{ role: "user", content: "Say hello" }];

test("chat.completions.create", async () => {
  const response = await client.chat.completions.create({ model: "gpt-4o-mini", messages });
  assert.equal(typeof response.choices[0].message.content, "string");
  assert.ok(response.choices[0].message.content.length > 0);
  assert.equal(response.choices[0].finish_reason, "stop");
  assert.ok(response.usage.total_tokens > 0);
});

test("stream: true with for await and chunk.choices[0]?.delta?.content", async () => {
  const stream = await client.chat.completions.create({ model: "gpt-4o-mini", messages, stream: true });
  let text = "";
  let chunks = 0;
  for await (const chunk of stream) {
    chunks += 1;
    // Without include_usage every chunk has a choice: the gateway keeps its usage chunk back.
    assert.ok(chunk.choices.length > 0);
    text += chunk.choices[0]?.delta?.content ?? "";
  }
  assert.ok(chunks > 2);
  assert.ok(text.length > 0);
});

test("the stream helper: .on('content') and finalChatCompletion()", async () => {
  const runner = client.chat.completions.stream({ model: "gpt-4o-mini", messages });
  let seen = "";
  runner.on("content", (delta) => {
    seen += delta;
  });
  const final = await runner.finalChatCompletion();
  assert.ok(seen.length > 0);
  assert.equal(final.choices[0].message.content, seen);
});

test("tools: finish_reason === 'tool_calls'", async () => {
  const response = await client.chat.completions.create({
    model: "gpt-4o",
    messages: [{ role: "user", content: "Weather in Paris?" }],
    tools: [
      {
        type: "function",
        function: {
          name: "get_weather",
          parameters: {
            type: "object",
            properties: { city: { type: "string" } },
            required: ["city"],
            additionalProperties: false,
          },
          strict: true,
        },
      },
    ],
    tool_choice: "required",
  });
  const choice = response.choices[0];
  assert.equal(choice.finish_reason, "tool_calls");
  assert.equal(choice.message.content, null);
  assert.equal(choice.message.tool_calls[0].function.name, "get_weather");
  assert.equal(typeof JSON.parse(choice.message.tool_calls[0].function.arguments).city, "string");
});

test("structured outputs: .parse() and message.parsed", async () => {
  const Event = z.object({ name: z.string(), attendees: z.number(), confirmed: z.boolean() });
  const completion = await client.chat.completions.parse({
    model: "gpt-4o",
    messages: [{ role: "user", content: "Alice and Bob meet on Friday." }],
    response_format: zodResponseFormat(Event, "event"),
  });
  const parsed = completion.choices[0].message.parsed;
  assert.equal(typeof parsed.name, "string");
  assert.equal(typeof parsed.attendees, "number");
  assert.equal(typeof parsed.confirmed, "boolean");
});

test("errors map to the SDK's classes", async () => {
  const bad = new OpenAI({ baseURL: process.env.GATEWAY_BASE_URL, apiKey: "sk-wrong", maxRetries: 0 });
  await assert.rejects(bad.chat.completions.create({ model: "gpt-4o", messages }), OpenAI.AuthenticationError);
  await assert.rejects(
    client.chat.completions.create({ model: "gpt-4o", messages: [] }),
    (err) => err instanceof OpenAI.BadRequestError && err.param === "messages",
  );
});
