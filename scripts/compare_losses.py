"""Compares the training losses of the same runs on two backends, step by step.

    python scripts/compare_losses.py CPU_RUNS_DIR GPU_RUNS_DIR

For every run directory present in both, prints the steps compared, the largest absolute
and relative loss difference, and the first and last losses of each side; exits 1 if a
relative difference exceeds --tolerance.
"""

import argparse
import json
import pathlib
import sys


def losses(run):
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--tolerance", type=float, default=0.05)
    args = ap.parse_args()
    a, b = pathlib.Path(args.a), pathlib.Path(args.b)
    worst_all = 0.0
    for run in sorted(p for p in a.iterdir() if (p / "metrics.jsonl").exists()):
        other = b / run.name
        if not (other / "metrics.jsonl").exists():
            print(f"{run.name}: missing in {b}")
            continue
        la, lb = losses(run), losses(other)
        steps = sorted(set(la) & set(lb))
        abs_d = max(abs(la[s] - lb[s]) for s in steps)
        rel_d = max(abs(la[s] - lb[s]) / abs(la[s]) for s in steps)
        worst_all = max(worst_all, rel_d)
        print(f"{run.name:<22} {len(steps):>3} steps | max |diff| {abs_d:.2e} | max rel {rel_d:.2e} | "
              f"{a.name}: {la[steps[0]]:.4f} -> {la[steps[-1]]:.4f} | {b.name}: {lb[steps[0]]:.4f} -> {lb[steps[-1]]:.4f}")
    sys.exit(1 if worst_all > args.tolerance else 0)


if __name__ == "__main__":
    main()
