#!/usr/bin/env python3
"""Compare q35jit `eval` logits with transformers goldens (tests/python/make_tiny_fixture.py output).

  compare_logits.py --golden G.safetensors --got OUT.safetensors [--tol 2e-2] [--label TEXT]

Prints one line: the relative error ||Δ||/||ref|| over all logits (gated by --tol; the bf16
definition of the issue), max|Δ|/max|ref| (reported), the positions whose argmax differs, and the
positions where the reference's top-2 gap is too small to call (< 4 x the max |Δ| of that row).
Exit status 1 when the relative error exceeds --tol, or an argmax differs where the reference's
margin is clear. Needs numpy + safetensors only.
"""
import argparse
import json
import sys

import numpy as np
from safetensors.numpy import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--golden", required=True)
    ap.add_argument("--got", required=True)
    ap.add_argument("--tensor", default="prompt_logits", help="golden tensor to compare with (default prompt_logits)")
    ap.add_argument("--tol", type=float, default=2e-2)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", help="append a JSON line with the figures to this file")
    a = ap.parse_args()

    ref = load_file(a.golden)[a.tensor].astype(np.float64)
    got = load_file(a.got)["logits"].astype(np.float64)
    if ref.shape != got.shape:
        print(f"{a.label}: shape mismatch: golden {ref.shape}, got {got.shape}")
        return 1
    if not np.isfinite(got).all():
        print(f"{a.label}: non-finite logits")
        return 1
    diff = np.abs(got - ref)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    rel_max = float(diff.max() / np.abs(ref).max())
    top2 = np.sort(ref, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    row_err = diff.max(axis=1)
    close = gap < 4 * row_err
    mismatch = np.argmax(got, axis=1) != np.argmax(ref, axis=1)
    bad = mismatch & ~close
    ok = rel <= a.tol and not bad.any()
    print(f"{a.label}: ||d||/||ref|| = {rel:.3e} (tol {a.tol:g}), max|d|/max|ref| = {rel_max:.3e}; argmax differs at {int(mismatch.sum())}/"
          f"{len(ref)} positions ({int(bad.sum())} with a clear margin); too close to call: "
          f"{np.flatnonzero(close).tolist()[:20]} -> {'PASS' if ok else 'FAIL'}")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"label": a.label, "rel_l2": rel, "rel_max": rel_max, "argmax_mismatch": int(mismatch.sum()),
                                "clear_mismatch": int(bad.sum()), "close": np.flatnonzero(close).tolist(),
                                "pass": bool(ok)}) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
