"""Compares the training losses (and gradient norms) of the same runs on two backends, step
by step.

    python scripts/compare_losses.py A_RUNS_DIR B_RUNS_DIR [--tolerance 1e-3]
        [--grad-tolerance 1e-2] [--table]

For every run directory present in both, prints the steps compared, the largest absolute
and relative loss difference, the largest relative gradient-norm difference, and the first
and last losses of each side (--table: every step). Exits 1 if a relative loss difference
exceeds --tolerance, or a relative gradient-norm difference exceeds --grad-tolerance (when
given), or a run is missing on the B side.
"""

import argparse
import json
import pathlib
import sys


def train_rows(run):
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return {r["step"]: r for r in rows if r.get("kind") == "train"}


def rel(a, b):
    return abs(a - b) / max(abs(a), 1e-12)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--tolerance", type=float, default=0.05, help="relative, per step, of the loss")
    ap.add_argument("--grad-tolerance", type=float, default=None,
                    help="relative, per step, of the gradient norm (default: not checked)")
    ap.add_argument("--table", action="store_true", help="print every step")
    args = ap.parse_args()
    a, b = pathlib.Path(args.a), pathlib.Path(args.b)
    failed = False
    runs = sorted(p for p in a.iterdir() if (p / "metrics.jsonl").exists())
    if not runs:
        print(f"no runs (metrics.jsonl) under {a}")
        sys.exit(1)
    for run in runs:
        other = b / run.name
        if not (other / "metrics.jsonl").exists():
            print(f"{run.name}: missing in {b}")
            failed = True
            continue
        ra, rb = train_rows(run), train_rows(other)
        steps = sorted(set(ra) & set(rb))
        if not steps:
            print(f"{run.name}: no train step in common")
            failed = True
            continue
        la = {s: ra[s]["loss"] for s in steps}
        lb = {s: rb[s]["loss"] for s in steps}
        ga = {s: ra[s].get("grad_norm") for s in steps}
        gb = {s: rb[s].get("grad_norm") for s in steps}
        abs_d = max(abs(la[s] - lb[s]) for s in steps)
        rel_d = max(rel(la[s], lb[s]) for s in steps)
        grad_steps = [s for s in steps if ga[s] is not None and gb[s] is not None]
        grad_d = max((rel(ga[s], gb[s]) for s in grad_steps), default=0.0)
        bad = rel_d > args.tolerance or (
            args.grad_tolerance is not None and grad_d > args.grad_tolerance)
        failed |= bad
        print(f"{'FAIL' if bad else 'ok  '} {run.name:<26} {len(steps):>3} steps | loss max |diff| {abs_d:.2e}, "
              f"max rel {rel_d:.2e} | grad norm max rel {grad_d:.2e} | "
              f"{a.name}: {la[steps[0]]:.6f} -> {la[steps[-1]]:.6f} | "
              f"{b.name}: {lb[steps[0]]:.6f} -> {lb[steps[-1]]:.6f}")
        if args.table:
            print(f"     {'step':>4} {'loss ' + a.name:>18} {'loss ' + b.name:>18} {'rel':>9} "
                  f"{'grad ' + a.name:>16} {'grad ' + b.name:>16} {'rel':>9}")
            for s in steps:
                g = (f"{ga[s]:16.6f} {gb[s]:16.6f} {rel(ga[s], gb[s]):9.2e}"
                     if s in grad_steps else "")
                print(f"     {s:>4} {la[s]:18.6f} {lb[s]:18.6f} {rel(la[s], lb[s]):9.2e} {g}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
