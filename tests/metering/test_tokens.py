from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import tiktoken

from app.main import create_app
from app.metering import tokens
from app.metering.tokens import count_chat_prompt, count_input, count_text, encoding_for_model

# Token ids published in OpenAI's cookbook "How to count tokens with tiktoken" (compare_encodings).
KNOWN_IDS = [
    ("hello world", [15339, 1917], [24912, 2375]),
    ("tiktoken is great!", [83, 1609, 5963, 374, 2294, 0], [83, 8251, 2488, 382, 2212, 0]),
    (
        "antidisestablishmentarianism",
        [519, 85342, 34500, 479, 8997, 2191],
        [493, 129901, 376, 160388, 21203, 2367],
    ),
    ("2 + 2 = 4", [17, 489, 220, 17, 284, 220, 19], [17, 659, 220, 17, 314, 220, 19]),
    (
        "お誕生日おめでとう",
        [33334, 45918, 243, 21990, 9080, 33334, 62004, 16556, 78699],
        [8930, 9697, 243, 128225, 8930, 17693, 4344, 48669],
    ),
]

# The cookbook's example conversation; OpenAI's API reported 129 prompt tokens for gpt-3.5-turbo and
# gpt-4 and 124 for gpt-4o and gpt-4o-mini.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


@pytest.mark.parametrize(("text", "cl100k_ids", "o200k_ids"), KNOWN_IDS)
def test_known_token_ids(text: str, cl100k_ids: list[int], o200k_ids: list[int]) -> None:
    assert encoding_for_model("gpt-4").encode_ordinary(text) == cl100k_ids
    assert encoding_for_model("gpt-4o").encode_ordinary(text) == o200k_ids
    assert count_text("gpt-3.5-turbo", text) == len(cl100k_ids)
    assert count_text("gpt-5", text) == len(o200k_ids)


def test_encodings_have_the_published_vocabulary_sizes() -> None:
    assert tokens.get_encoding("cl100k_base").n_vocab == 100277
    assert tokens.get_encoding("o200k_base").n_vocab == 200019


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-5", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("gpt-5-nano-2025-08-07", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-4.1-nano-2025-04-14", "o200k_base"),
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("o1", "o200k_base"),
        ("o1-mini", "o200k_base"),
        ("o3", "o200k_base"),
        ("o3-mini-2025-01-31", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-oss-120b", "o200k_base"),
        ("ft:gpt-4o-mini-2024-07-18:org::abc123", "o200k_base"),
        ("a-model-nobody-knows", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("GPT-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
    ],
)
def test_encoding_for_model(model: str, encoding: str) -> None:
    assert encoding_for_model(model).name == encoding


def test_encodings_are_built_once_and_shared() -> None:
    assert encoding_for_model("gpt-4o") is encoding_for_model("o3-mini")
    assert encoding_for_model("gpt-4") is tokens.get_encoding("cl100k_base")


def test_concurrent_first_use_builds_one_encoding() -> None:
    tokens.get_encoding.cache_clear()
    tokens._build_encoding.cache_clear()
    barrier = threading.Barrier(8)
    seen: list[tiktoken.Encoding] = []

    def use() -> None:
        barrier.wait()
        seen.append(tokens.get_encoding("cl100k_base"))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 8
    assert all(enc is seen[0] for enc in seen)
    assert tokens._build_encoding.cache_info().misses == 1


def test_a_vocabulary_with_the_wrong_hash_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tokens._EXPECTED_SHA256, "cl100k_base", "0" * 64)
    with pytest.raises(tokens.VocabularyError, match="SHA-256"):
        tokens._build_encoding.__wrapped__("cl100k_base")


def test_unshipped_encoding_is_refused() -> None:
    with pytest.raises(ValueError, match="p50k_base"):
        tokens.get_encoding("p50k_base")


def test_special_token_text_counts_as_ordinary_text() -> None:
    assert count_text("gpt-4o", "<|endoftext|>") == 7
    assert count_text("gpt-4", "<|endoftext|>") == 7


@pytest.mark.parametrize("model", [None, 4, ["gpt-4"], ""])
def test_odd_model_values_count_with_o200k(model: Any) -> None:
    assert encoding_for_model(model).name == "o200k_base"
    assert count_text(model, "hello world") == 2
    assert count_chat_prompt(model, {"messages": [{"role": "user", "content": "hello world"}]}) == 9
    assert count_input(model, ["hello world"]) == 2


def test_count_text_odd_input() -> None:
    assert count_text("gpt-4o", "") == 0
    assert count_text("gpt-4o", None) == 0  # type: ignore[arg-type]
    assert count_text("gpt-4o", 42) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize(("model", "expected"), [("gpt-3.5-turbo", 129), ("gpt-4", 129), ("gpt-4-0613", 129)])
def test_cookbook_conversation_cl100k(model: str, expected: int) -> None:
    assert count_chat_prompt(model, {"model": model, "messages": COOKBOOK_MESSAGES}) == expected


@pytest.mark.parametrize(("model", "expected"), [("gpt-4o", 124), ("gpt-4o-mini", 124)])
def test_cookbook_conversation_o200k(model: str, expected: int) -> None:
    assert count_chat_prompt(model, {"model": model, "messages": COOKBOOK_MESSAGES}) == expected


def test_single_message_formula() -> None:
    # 3 per message + "user" (1) + "hello world" (2) + 3 reply priming
    body = {"messages": [{"role": "user", "content": "hello world"}]}
    assert count_chat_prompt("gpt-4o", body) == 9
    # + "bob" (1) + 1 for the name field
    body = {"messages": [{"role": "user", "name": "bob", "content": "hello world"}]}
    assert count_chat_prompt("gpt-4o", body) == 11


def test_content_parts_count_text_and_ignore_images_and_audio() -> None:
    parts = [
        {"type": "text", "text": "hello"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "text", "text": " world"},
    ]
    as_parts = count_chat_prompt("gpt-4o", {"messages": [{"role": "user", "content": parts}]})
    # 3 + "user" (1) + "hello" (1) + " world" (1) + 3
    assert as_parts == 9


def test_assistant_tool_calls_and_tool_results() -> None:
    body = {
        "messages": [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc123",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_abc123", "content": "22C"},
        ]
    }
    # assistant: 3 + "assistant" 1 + "get_weather" 2 + arguments 5; tool: 3 + "tool" 1 + "22C" 2; +3
    assert count_chat_prompt("gpt-4o", body) == 20


def test_legacy_function_call_and_refusal_parts() -> None:
    body = {
        "messages": [
            {"role": "assistant", "function_call": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "hello world"}]},
        ]
    }
    # 3 + 1 + 2 + 5, then 3 + 1 + 2, then 3
    assert count_chat_prompt("gpt-4o", body) == 20


def test_tools_are_counted_by_their_compact_json() -> None:
    function: dict[str, Any] = {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    }
    messages = [{"role": "user", "content": "hello world"}]
    serialized = json.dumps(function, separators=(",", ":"))
    definition_tokens = count_text("gpt-4o", serialized)
    assert definition_tokens == 50
    tools_body = {"messages": messages, "tools": [{"type": "function", "function": function}]}
    assert count_chat_prompt("gpt-4o", tools_body) == 9 + definition_tokens
    functions_body = {"messages": messages, "functions": [function]}
    assert count_chat_prompt("gpt-4o", functions_body) == 9 + definition_tokens


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "a string",
        {},
        {"messages": None},
        {"messages": "hello"},
        {"messages": [None, 3, "x", []]},
        {"messages": [{"role": 5, "content": 5, "name": None}]},
        {"messages": [{"content": [None, 7, {"type": "text", "text": None}, {"type": "text"}, "raw"]}]},
        {
            "messages": [
                {"role": "assistant", "tool_calls": [None, {"function": None}, {"function": {"name": 1}}]}
            ]
        },
        {"messages": [{"role": "assistant", "tool_calls": "nope", "function_call": "nope"}]},
        {"tools": "nope", "functions": {"a": 1}},
        {"tools": [None, 1, {"type": "function", "function": None}, {"type": "web_search"}]},
    ],
)
def test_count_chat_prompt_never_raises(body: Any) -> None:
    assert count_chat_prompt("gpt-4o", body) >= 0


def test_unserialisable_tools_are_skipped() -> None:
    circular: dict[str, Any] = {"name": "loop"}
    circular["self"] = circular
    body = {"messages": [], "tools": [{"type": "function", "function": circular}]}
    assert count_chat_prompt("gpt-4o", body) == 3


def test_count_input_embeddings() -> None:
    model = "text-embedding-3-small"
    assert count_input(model, "hello world") == 2
    assert count_input(model, ["hello world", "tiktoken is great!"]) == 8
    assert count_input(model, [15339, 1917, 0]) == 3
    assert count_input(model, [[15339, 1917], [0]]) == 3
    assert count_input(model, "") == 0
    assert count_input(model, []) == 0


def test_count_input_odd_input() -> None:
    model = "text-embedding-3-large"
    assert count_input(model, None) == 0  # type: ignore[arg-type]
    assert count_input(model, {"input": "x"}) == 0  # type: ignore[arg-type]
    assert count_input(model, [None, 1.5, True, "hello world", 7, [1, "x", None]]) == 4


def test_the_shipped_vocabularies_pass_the_start_up_check() -> None:
    tokens.verify_vocabularies()


def test_a_damaged_vocabulary_stops_the_gateway_at_start_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(tokens._EXPECTED_SHA256, "o200k_base", "0" * 64)
    monkeypatch.setenv("GATEWAY_MASTER_KEY", "sk-test-master-key")
    with pytest.raises(SystemExit) as exited:
        create_app()
    assert exited.value.code == 2
    assert "tokenizer vocabulary o200k_base does not match its pinned SHA-256" in capsys.readouterr().err
