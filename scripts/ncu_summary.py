#!/usr/bin/env python3
"""Sums an Nsight Compute raw CSV (--csv --page raw --metrics gpu__time_duration.sum
--print-units base) per kernel: total microseconds per run, launches per run, share of the total.
Kernels are grouped by their name up to the template arguments, and listed with the most costly
full names under each."""
import argparse
import collections
import csv
import io
import sys


def read_rows(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        sys.exit(f"{path}: no ncu CSV header (\"ID\",...) found; was the program profiled?")
    rows = list(csv.reader(io.StringIO(text[start:])))
    header = rows[0]
    try:
        name_col = header.index("Kernel Name")
        time_col = header.index("gpu__time_duration.sum")
    except ValueError as e:
        sys.exit(f"{path}: column missing in the ncu CSV: {e}")
    out = []
    for r in rows[1:]:
        if len(r) <= max(name_col, time_col):
            continue
        try:
            ns = float(r[time_col].replace(",", ""))
        except ValueError:
            continue  # the units row
        out.append((r[name_col], ns))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--title", default="")
    ap.add_argument("--runs", type=int, default=1, help="how many prefills the CSV holds")
    ap.add_argument("--top", type=int, default=3, help="full names shown per group")
    a = ap.parse_args()
    rows = read_rows(a.csv)
    if not rows:
        sys.exit(f"{a.csv}: no kernel rows")
    groups = collections.defaultdict(lambda: [0.0, 0, collections.defaultdict(lambda: [0.0, 0])])
    for name, ns in rows:
        base = name.split("<")[0].split("(")[0]
        g = groups[base]
        g[0] += ns
        g[1] += 1
        g[2][name][0] += ns
        g[2][name][1] += 1
    total = sum(g[0] for g in groups.values())
    print(f"\n### {a.title}: {total / 1e3 / a.runs:.1f} us of kernels per run, {len(rows) // a.runs} launches\n")
    print("| kernel | us / run | launches / run | share |")
    print("|---|---|---|---|")
    for base, (ns, n, names) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f"| {base} | {ns / 1e3 / a.runs:.1f} | {n // a.runs} | {100 * ns / total:.1f}% |")
        for full, (fns, fn) in sorted(names.items(), key=lambda kv: -kv[1][0])[: a.top]:
            if full != base:
                print(f"| &nbsp;&nbsp;{full[:150]} | {fns / 1e3 / a.runs:.1f} | {fn // a.runs} | |")


if __name__ == "__main__":
    main()
