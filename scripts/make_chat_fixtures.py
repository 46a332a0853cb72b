#!/usr/bin/env python3
"""Golden fixtures for kiln's Qwen2.5 chat template and Hugging Face tokenizer support.

Builds a small Qwen2-style tokenizer (byte-level BPE with Qwen2's pre-tokenizer regex and its
special tokens, trained on the shipped corpus) and renders a set of conversations, with tools,
parallel tool calls, grouped tool responses, multi-turn and non-ASCII text, through
`transformers`' `apply_chat_template` using the verbatim Qwen2.5-Instruct template
(`../shared/reference/qwen2.5-chat-template.jinja`). Writes into `tests/fixtures/chat/`:

  tokenizer.json            the tokenizer (also loadable by kiln's `[tokenizer] kind = "hf"`)
  tokenizer_config.json     with the chat template, as Hugging Face model directories have it
  conversations.jsonl       the input rows: {"messages": [...], "tools": [...]}
  expected.jsonl            per row: the rendered text and the token ids transformers produces

Regenerate (from the repository root; needs transformers and tokenizers from PyPI):

    python3 -m venv .venv && .venv/bin/pip install torch transformers
    .venv/bin/python scripts/make_chat_fixtures.py
"""

import glob
import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "chat")
TEMPLATE = os.path.join(ROOT, "..", "shared", "reference", "qwen2.5-chat-template.jinja")

# Qwen2's pre-tokenizer split pattern (from its tokenizer.json).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_papers",
        "description": "Search a paper index.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "default": 5}},
            "required": ["query"],
        },
    },
}

CONVERSATIONS = [
    # Plain chat, no system message (the template inserts the default one).
    {"messages": [
        {"role": "user", "content": "Why does bread rise?"},
        {"role": "assistant", "content": "Yeast eats sugar and makes gas.\nThe gas is trapped by gluten."},
    ]},
    # System message, multi-turn.
    {"messages": [
        {"role": "system", "content": "You are a concise research assistant."},
        {"role": "user", "content": "Name a kiln type."},
        {"role": "assistant", "content": "A downdraft kiln."},
        {"role": "user", "content": "And another?"},
        {"role": "assistant", "content": "An anagama, a tunnel-shaped wood kiln."},
    ]},
    # Tools, one call, its response, and the final answer; non-ASCII in arguments.
    {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "What's the weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}},
        ]},
        {"role": "tool", "content": "{\"temperature\": 21.5, \"sky\": \"clear\"}"},
        {"role": "assistant", "content": "It is 21.5 °C and clear in Zürich."},
    ]},
    # Parallel tool calls with text before them, two grouped tool responses, a system message.
    {"tools": [WEATHER, SEARCH], "messages": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Oslo and Lima, and papers on kilns."},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lima"}}},
            {"type": "function", "function": {"name": "search_papers", "arguments": {"query": "kiln firing schedules", "limit": 3}}},
        ]},
        {"role": "tool", "content": "{\"temperature\": -2}"},
        {"role": "tool", "content": "{\"temperature\": 19}"},
        {"role": "tool", "content": "[\"Ramps and holds (1998)\"]"},
        {"role": "assistant", "content": "Oslo is at -2, Lima at 19; one paper: Ramps and holds (1998)."},
    ]},
    # Tool call without the function wrapper, nested arguments with a float and a list.
    {"tools": [SEARCH], "messages": [
        {"role": "user", "content": "Find two papers."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"name": "search_papers", "arguments": {"query": "glaze", "limit": 2, "filters": {"years": [1990, 2001], "score": 0.5, "open": True, "tag": None}}},
        ]},
        {"role": "tool", "content": "[]"},
        {"role": "assistant", "content": "Nothing found."},
    ]},
]


def build_tokenizer():
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = sorted(glob.glob(os.path.join(ROOT, "data", "tinytales", "*.txt")))
    tok.train(files, trainer)
    return tok


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = build_tokenizer()
    tok.save(os.path.join(OUT, "tokenizer.json"))
    template = open(TEMPLATE).read()
    fast = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(OUT, "tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = template
    fast.save_pretrained(OUT)
    # save_pretrained rewrites tokenizer.json; keep ours (identical content, stable bytes).
    tok.save(os.path.join(OUT, "tokenizer.json"))
    with open(os.path.join(OUT, "conversations.jsonl"), "w") as conv, open(os.path.join(OUT, "expected.jsonl"), "w") as exp:
        for row in CONVERSATIONS:
            conv.write(json.dumps(row, ensure_ascii=False) + "\n")
            kwargs = {"tools": row["tools"]} if "tools" in row else {}
            text = fast.apply_chat_template(row["messages"], tokenize=False, **kwargs)
            ids = fast.apply_chat_template(row["messages"], tokenize=True, return_dict=False, **kwargs)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            assert fast(text, add_special_tokens=False)["input_ids"] == list(ids)
            exp.write(json.dumps({"text": text, "ids": list(ids)}, ensure_ascii=False) + "\n")
    print(f"wrote {len(CONVERSATIONS)} conversations, vocab {tok.get_vocab_size()} to {OUT}")


if __name__ == "__main__":
    main()
