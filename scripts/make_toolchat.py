#!/usr/bin/env python3
"""Writes data/toolchat/conversations.jsonl: tool-calling chat conversations written for
kiln (CC0), in the chat JSONL format kiln reads (`messages`, optional `tools`), for the QLoRA
smoke recipe, and data/toolchat/test.jsonl, a held-out test set for `kiln eval
--tool-calls`. Deterministic: rerun to regenerate both byte for byte.

    python3 scripts/make_toolchat.py

Each test row ends with the assistant turn a model should produce: a tool call (the
conversation cut after the user's request) or a text answer (cut after the tool's reply).
No test row's prompt occurs in the training conversations.

Every conversation offers one or two small tools. Most ask for something a tool does, and the
assistant answers with a tool call, reads the tool's reply and answers in one sentence; some
need no tool and get a plain answer. Only the standard library is used.
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "toolchat" / "conversations.jsonl"
TEST = OUT.with_name("test.jsonl")

TOOLS = {
    "get_weather": {
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
    "convert_units": {
        "description": "Convert a quantity between units.",
        "parameters": {
            "type": "object",
            "properties": {
                "value": {"type": "number"},
                "from": {"type": "string"},
                "to": {"type": "string"},
            },
            "required": ["value", "from", "to"],
        },
    },
    "set_timer": {
        "description": "Start a kitchen timer.",
        "parameters": {
            "type": "object",
            "properties": {"minutes": {"type": "integer"}, "label": {"type": "string"}},
            "required": ["minutes"],
        },
    },
}

CITIES = ["Oslo", "Lima", "Paris", "Cairo", "Tokyo", "Quito", "Delhi", "Perth", "Rome",
          "Accra", "Dublin", "Seoul", "Hanoi", "Bern", "Riga", "Nairobi", "Porto", "Austin"]
SKIES = ["clear", "cloudy", "rainy", "windy", "foggy", "snowy"]
WEATHER_ASKS = ["What's the weather in {c}?", "How is the weather in {c} today?",
                "Is it warm in {c} right now?", "Weather in {c}, please.",
                "Tell me the weather in {c}."]
CONVERSIONS = [("km", "miles", 0.621371), ("kg", "pounds", 2.20462), ("litres", "cups", 4.22675),
               ("metres", "feet", 3.28084), ("grams", "ounces", 0.035274)]
CONVERT_ASKS = ["Convert {v} {f} to {t}.", "How many {t} is {v} {f}?", "What is {v} {f} in {t}?"]
TIMER_ASKS = ["Set a timer for {m} minutes for the {l}.", "Remind me in {m} minutes about the {l}.",
              "Start a {m} minute timer for the {l}."]
LABELS = ["bread", "tea", "pasta", "kiln", "eggs", "rice", "laundry", "glaze"]
PLAIN = [("Thanks, that is all.", "You're welcome!"),
         ("Hello!", "Hello! How can I help?"),
         ("What can you do?", "I can check the weather, convert units and set timers."),
         ("Who made you?", "I am a small assistant trained with kiln."),
         ("Good night.", "Good night!")]


def tool(name):
    return {"type": "function", "function": {"name": name, **TOOLS[name]}}


def call(name, arguments):
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def weather(rng):
    city = rng.choice(CITIES)
    temp = rng.randint(-5, 34)
    sky = rng.choice(SKIES)
    return ["get_weather"], [
        {"role": "user", "content": rng.choice(WEATHER_ASKS).format(c=city)},
        call("get_weather", {"city": city}),
        {"role": "tool", "content": json.dumps({"temperature": temp, "sky": sky})},
        {"role": "assistant", "content": f"It is {temp} °C and {sky} in {city}."},
    ]


def convert(rng):
    f, t, k = rng.choice(CONVERSIONS)
    v = rng.randint(1, 50)
    result = round(v * k, 2)
    return ["convert_units"], [
        {"role": "user", "content": rng.choice(CONVERT_ASKS).format(v=v, f=f, t=t)},
        call("convert_units", {"value": v, "from": f, "to": t}),
        {"role": "tool", "content": json.dumps({"result": result})},
        {"role": "assistant", "content": f"{v} {f} is {result} {t}."},
    ]


def timer(rng):
    m = rng.choice([3, 5, 8, 10, 12, 15, 20, 25, 30, 45])
    label = rng.choice(LABELS)
    return ["set_timer"], [
        {"role": "user", "content": rng.choice(TIMER_ASKS).format(m=m, l=label)},
        call("set_timer", {"minutes": m, "label": label}),
        {"role": "tool", "content": json.dumps({"ok": True})},
        {"role": "assistant", "content": f"Your {label} timer is set for {m} minutes."},
    ]


def plain(rng):
    ask, answer = rng.choice(PLAIN)
    return [], [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]


def main():
    rng = random.Random(20261122)
    kinds = [weather] * 8 + [convert] * 5 + [timer] * 4 + [plain] * 3
    rows = []
    for _ in range(240):
        used, messages = rng.choice(kinds)(rng)
        # Offer the tool that is needed plus, sometimes, one that is not.
        offered = list(used)
        others = [n for n in TOOLS if n not in offered]
        if not offered or rng.random() < 0.4:
            offered.append(rng.choice(others))
        rng.shuffle(offered)
        rows.append({"tools": [tool(n) for n in offered], "messages": messages})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} conversations to {OUT}")
    test = test_set(rows)
    with TEST.open("w", encoding="utf-8") as f:
        for row in test:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(test)} held-out test rows to {TEST}")


def test_set(train_rows):
    """Held-out rows: 24 that expect a tool call and 12 that expect a text answer after a
    tool's reply, none of whose prompts (tools offered and messages before the expected
    turn) occurs in training."""
    def key(tools, messages):
        return json.dumps([tools, messages], sort_keys=True)

    seen = set()
    for row in train_rows:
        for cut in range(1, len(row["messages"])):
            seen.add(key(row["tools"], row["messages"][:cut]))
    rng = random.Random(20261123)
    wanted = {"call": 24, "answer": 12}
    out = []
    while wanted["call"] or wanted["answer"]:
        used, messages = rng.choice([weather, weather, convert, timer])(rng)
        offered = list(used)
        if rng.random() < 0.4:
            offered.append(rng.choice([n for n in TOOLS if n not in offered]))
        rng.shuffle(offered)
        tools = [tool(n) for n in offered]
        # The tool call follows the user's request; the answer follows the tool's reply.
        kind = "call" if wanted["call"] and (not wanted["answer"] or rng.random() < 0.67) else "answer"
        cut = 1 if kind == "call" else 3
        prompt = messages[:cut]
        if key(tools, prompt) in seen:
            continue
        seen.add(key(tools, prompt))
        wanted[kind] -= 1
        out.append({"tools": tools, "messages": messages[:cut + 1]})
    return out


if __name__ == "__main__":
    main()
