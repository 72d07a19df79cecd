"""Weight error of each offline weight-scale rule (``mxdit.quant.offline_rules``), per scheme.

SQNR (dB) of the dequantized weight against the original, for the OCP floor rule
(mxdit.formats), the NVIDIA rceil rule, msmodelslim's minmax (8/7 factor) and
ceil_x (c = 7.25) rules, and the per-block ``mse`` choice; on a Wan-like Gaussian
weight and a heavy-tailed one.  The winner per scheme is marked.

Usage:  .venv/bin/python benchmarks/bench_weight_rules.py [--rows N] [--cols K] [--seed S]
"""
from __future__ import annotations

import argparse
import time

from mxdit.quant.offline_rules import RULES, measure_rules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=5120)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = measure_rules(args.rows, args.cols, args.seed)
    print(f"weight SQNR in dB ({args.rows} x {args.cols}, seed {args.seed}; * = best)\n")
    print("| scheme | distribution | " + " | ".join(RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    for r in rows:
        vals = {k: r[k] for k in RULES if r[k] is not None}
        best = max(vals, key=vals.get)
        cells = [("n/a" if r[k] is None else f"{r[k]:.2f}" + ("*" if k == best else "")) for k in RULES]
        print(f"| {r['scheme']} | {r['distribution']} | " + " | ".join(cells) + " |")
    print(f"\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
