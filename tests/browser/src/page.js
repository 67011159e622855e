// The page side of browser tokens, as a product team writes it: ask the page's own backend for a token
// (it holds the gateway key), then call the gateway straight from the browser with the official SDK.
import OpenAI from "openai";

const answer = document.getElementById("answer");
const status = document.getElementById("status");
// The test names the call's X-Request-Id, to find its usage row.
const requestId = new URLSearchParams(location.hash.slice(1)).get("request_id") ?? crypto.randomUUID();

async function main() {
  const { token, baseURL } = await (await fetch("/token", { method: "POST" })).json();
  const client = new OpenAI({ apiKey: token, baseURL, dangerouslyAllowBrowser: true, maxRetries: 0 });
  status.textContent = "Streaming…";
  const stream = await client.chat.completions.create(
    { model: "gpt-4o-mini", messages: [{ role: "user", content: "Say hello to the browser" }], stream: true },
    // A page cannot bill another feature or user: the token fixes both, whatever it sends.
    { headers: { "X-Request-Id": requestId, "X-Feature": "spoofed-feature", "X-User-Id": "spoofed-user" } },
  );
  for await (const chunk of stream) {
    answer.textContent += chunk.choices[0]?.delta?.content ?? "";
  }
  status.textContent = "Done";
  document.body.dataset.state = "done";
}

main().catch((error) => {
  status.textContent = `Error: ${error.message}`;
  document.body.dataset.state = "error";
});
