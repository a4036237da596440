#!/usr/bin/env python3
"""How much of a real trace's keys any valid cell bound lets a search skip.

The best-first search opens a cell when its bound on q.k reaches the query's threshold (the
R-th best key; R = rescore_tokens). This measures, on a trace written by
`model_quality --trace_dir` (format in bench/README.md), the share of keys that sit in cells
whose bound reaches the *exact* threshold (the R-th best true score, the most favourable
threshold a search could have), for:

  ball      q.c + |q| R_c                      (the tree's bound at cell_bound_slack 1)
  ball-0.4  q.c + 0.4 |q| R_c                  (the default's slack: not a valid bound)
  boxM      q.c + sum_{i<M} max(p_i lo_i, p_i hi_i) + |q_perp| R_perp
            (a bounding box of the cell's residuals on the top M principal directions of the
             tree's residuals, a ball on the rest: valid, tighter than the ball; M = dim is the
             exact box in that basis)

Cells: every `--spacing`-th token is a centre, each key joins its nearest centre (what the
tree's level-1 cells approximate). Writes a CSV of every (layer, head, query) and prints
medians per bound.
"""
import argparse
import csv
import os

import numpy as np


def read_trace(path):
    try:
        buf = open(path, "rb").read()
    except OSError as e:
        raise SystemExit(f"{path}: {e.strerror}")
    if len(buf) < 64 or buf[:8] != b"ICTRACE1":
        raise SystemExit(f"{path}: not an ICTRACE1 file")
    h = np.frombuffer(buf, np.uint32, 10, 8)
    version, layers, kv_heads, q_heads, dim, n, nq, dtype, flags, dlen = (int(x) for x in h)
    if version != 1 or dtype not in (0, 1) or kv_heads == 0 or q_heads % kv_heads or nq == 0:
        raise SystemExit(f"{path}: unsupported header (version {version}, kv dtype {dtype}; "
                         "this script reads version 1 with fp32 or fp16 keys)")
    pad = lambda x: (x + 63) // 64 * 64
    es = 4 if dtype == 0 else 2
    kv = layers * kv_heads * n * dim
    need = 64 + pad(dlen) + pad(4 * nq) + pad(kv * es) * (2 if flags & 1 else 1) + 4 * layers * q_heads * nq * dim
    if len(buf) < need:
        raise SystemExit(f"{path}: truncated ({len(buf)} bytes, the header describes {need})")
    off = 64 + pad(dlen)
    pos = np.frombuffer(buf, np.uint32, nq, off)
    off += pad(4 * nq)
    keys = np.frombuffer(buf, np.float32 if dtype == 0 else np.float16, kv, off)
    off += pad(kv * es) * (2 if flags & 1 else 1)
    queries = np.frombuffer(buf, np.float32, layers * q_heads * nq * dim, off)
    return pos, keys.reshape(layers, kv_heads, n, dim), queries.reshape(layers, q_heads, nq, dim)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--spacing", type=int, nargs="+", default=[100, 16])
    ap.add_argument("--rescore", type=int, default=64, help="R: the threshold is the R-th best key")
    ap.add_argument("--first_layer", type=int, default=2)
    ap.add_argument("--layer_step", type=int, default=2)
    ap.add_argument("--query_step", type=int, default=4)
    ap.add_argument("--out", default="bench/results/bound_pruning")
    a = ap.parse_args()
    if min(a.spacing) < 1 or a.rescore < 1 or a.layer_step < 1 or a.query_step < 1:
        ap.error("--spacing, --rescore, --layer_step and --query_step must be at least 1")
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for path in a.traces:
        name = os.path.basename(path).split(".")[0]
        pos, keys, queries = read_trace(path)
        layers, kv_heads, _, dim = keys.shape
        group = queries.shape[1] // kv_heads
        n = int(pos[0])  # the keys every query sees
        if n < a.rescore:
            raise SystemExit(f"{path}: {n} keys before the first query, fewer than --rescore {a.rescore}")
        for spacing in a.spacing:
            ms = [m for m in (8, 16, dim) if m <= dim]
            for layer in range(a.first_layer, layers, a.layer_step):
                for head in range(kv_heads):
                    k = keys[layer, head, :n].astype(np.float64)
                    centres = k[::spacing]
                    d2 = (k * k).sum(1)[:, None] - 2 * k @ centres.T + (centres * centres).sum(1)[None]
                    cell = d2.argmin(1)
                    res = k - centres[cell]
                    _, _, vt = np.linalg.svd(res - res.mean(0), full_matrices=False)
                    proj = res @ vt.T
                    nc = len(centres)
                    count = np.bincount(cell, minlength=nc)
                    radius = np.zeros(nc)
                    lo = {m: np.zeros((nc, m)) for m in ms}
                    hi = {m: np.zeros((nc, m)) for m in ms}
                    rperp = {m: np.zeros(nc) for m in ms}
                    for c in range(nc):
                        idx = np.flatnonzero(cell == c)
                        if idx.size == 0:
                            continue
                        radius[c] = np.sqrt((res[idx] ** 2).sum(1)).max()
                        for m in ms:
                            lo[m][c] = proj[idx, :m].min(0)
                            hi[m][c] = proj[idx, :m].max(0)
                            if m < dim:
                                rperp[m][c] = np.sqrt((proj[idx, m:] ** 2).sum(1)).max()
                    for g in range(group):
                        for qi in range(0, queries.shape[2], a.query_step):
                            q = queries[layer, head * group + g, qi].astype(np.float64)
                            thr = np.partition(k @ q, n - a.rescore)[n - a.rescore]
                            qc, qn, qp = centres @ q, np.linalg.norm(q), vt @ q
                            share = lambda b: float(count[b >= thr].sum()) / n
                            r = {"ball": share(qc + qn * radius), "ball-0.4": share(qc + 0.4 * qn * radius)}
                            for m in ms:
                                perp = np.sqrt(max(qn * qn - (qp[:m] ** 2).sum(), 0.0))
                                b = qc + np.maximum(qp[:m] * lo[m], qp[:m] * hi[m]).sum(1) + perp * rperp[m]
                                r[f"box{m}"] = share(b)
                            for bound, v in r.items():
                                rows.append({"trace": name, "spacing": spacing, "layer": layer, "head": head,
                                             "q_head": head * group + g, "query": qi, "bound": bound,
                                             "share_opened": round(v, 5)})
                print(f"{name}: {spacing} keys per cell, layer {layer} of {layers}", flush=True)
    with open(os.path.join(a.out, "bound_pruning.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    bounds = sorted({r["bound"] for r in rows}, key=lambda s: (len(s), s))
    print("\n| trace | keys per cell | " + " | ".join(bounds) + " |")
    for name in dict.fromkeys(r["trace"] for r in rows):
        for spacing in a.spacing:
            sel = [r for r in rows if r["trace"] == name and r["spacing"] == spacing]
            med = [np.median([r["share_opened"] for r in sel if r["bound"] == b]) for b in bounds]
            mean = [np.mean([r["share_opened"] for r in sel if r["bound"] == b]) for b in bounds]
            print(f"| {name} | {spacing} | " + " | ".join(f"{m:.3f} ({x:.3f})" for m, x in zip(med, mean)) + " |")
    print("(median (mean) share of the keys in cells whose bound reaches the exact threshold)")


if __name__ == "__main__":
    main()
