#!/usr/bin/env python3
"""Writes data/toolchat/conversations.jsonl: tool-calling chat conversations written for
kiln (CC0), in the chat JSONL format kiln reads (`messages`, optional `tools`), for the QLoRA
smoke recipe. Deterministic: rerun to regenerate byte for byte.

    python3 scripts/make_toolchat.py

Every conversation offers one or two small tools. Most ask for something a tool does, and the
assistant answers with a tool call, reads the tool's reply and answers in one sentence; some
need no tool and get a plain answer. Only the standard library is used.
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "toolchat" / "conversations.jsonl"

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


if __name__ == "__main__":
    main()
