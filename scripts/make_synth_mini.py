"""Writes data/synth-mini/: a small SYNTH-style reasoning corpus for ConvGPT smoke training.

The rows mimic the layout of PleIAs' SYNTH dataset (a query, a synthetic reasoning trace and
a synthetic answer per row, plus id, language and exercise columns), but every row is
generated here from templates: arithmetic word problems, unit conversions, comparisons and
number sequences, each worked step by step. Deterministic (seeded); written for kiln and
released under CC0 like the rest of data/.

    .venv/bin/pip install pyarrow
    .venv/bin/python scripts/make_synth_mini.py
"""

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent.parent / "data" / "synth-mini"
NAMES = ["Ada", "Bram", "Chen", "Dara", "Emil", "Fatou", "Goran", "Hana", "Ines", "Jonas"]
ITEMS = ["apples", "pencils", "stamps", "marbles", "books", "shells", "cards", "coins"]


def word_problem(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(3, 40), rng.randint(2, 25), rng.randint(1, 15)
    query = f"{name} has {a} {item}, buys {b} more and gives away {c}. How many {item} does {name} have now?"
    reasoning = (
        f"Start with {a} {item}. Buying {b} more gives {a} + {b} = {a + b}. "
        f"Giving away {c} leaves {a + b} - {c} = {a + b - c}."
    )
    return "arithmetic", query, reasoning, f"{name} has {a + b - c} {item}."


def conversion(rng):
    unit, factor, to = rng.choice([("kilometres", 1000, "metres"), ("hours", 60, "minutes"),
                                   ("kilograms", 1000, "grams"), ("minutes", 60, "seconds")])
    n = rng.randint(2, 19)
    query = f"How many {to} are there in {n} {unit}?"
    reasoning = f"One of the {unit} is {factor} {to}, so {n} of them are {n} x {factor} = {n * factor} {to}."
    return "conversion", query, reasoning, f"There are {n * factor} {to} in {n} {unit}."


def comparison(rng):
    a, b = rng.sample(NAMES, 2)
    x, y = rng.sample(range(10, 99), 2)
    query = f"{a} scored {x} points and {b} scored {y}. Who scored more, and by how much?"
    hi, lo = (a, b) if x > y else (b, a)
    reasoning = f"Compare {x} and {y}: the larger is {max(x, y)}, scored by {hi}. The difference is {max(x, y)} - {min(x, y)} = {abs(x - y)}."
    return "comparison", query, reasoning, f"{hi} scored {abs(x - y)} more points than {lo}."


def sequence(rng):
    start, step = rng.randint(1, 20), rng.randint(2, 9)
    seq = [start + i * step for i in range(5)]
    query = f"What number comes next: {', '.join(map(str, seq))}?"
    reasoning = f"Each number is {step} more than the one before ({seq[1]} - {seq[0]} = {step}). So the next is {seq[-1]} + {step} = {seq[-1] + step}."
    return "sequence", query, reasoning, f"The next number is {seq[-1] + step}."


def main():
    rng = random.Random(2024)
    makers = [word_problem, conversion, comparison, sequence]
    rows = []
    for i in range(480):
        exercise, query, reasoning, answer = rng.choice(makers)(rng)
        rows.append({
            "synth_id": f"kiln-synth-{i:05d}",
            "language": "en",
            "exercise": exercise,
            "query": query,
            "synthetic_reasoning": reasoning,
            "synthetic_answer": answer,
        })
    OUT.mkdir(parents=True, exist_ok=True)
    for shard in range(2):
        part = rows[shard * 240:(shard + 1) * 240]
        table = pa.Table.from_pylist(part)
        pq.write_table(table, OUT / f"train-{shard:05d}.parquet", row_group_size=60, compression="zstd")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
