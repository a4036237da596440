#!/usr/bin/env python3
"""Which cell ranking finds a real trace's best keys while opening the fewest keys.

No valid bound prunes the real traces' cells (bound_pruning.py), so the best-first search
ranks cells by an estimate of their best key and stops early: the default uses the tree's
ball with a slack, q.c + s |q| R_c (s = cell_bound_slack = 0.4), which assumes the same
alignment of the query with a cell's farthest residual in every direction. This compares, on
a trace written by `model_quality --trace_dir` (format in bench/README.md), that family with
estimates that look at how a cell's residuals actually spread along the query:

  ball-s     q.c + s |q| R_c                                  (the tree's family)
  sigma-z    q.c + z sigma_c(q), sigma_c(q)^2 = sum_{i<M} v_ci (q.u_i)^2 + w_c |q_perp|^2
             (v_ci: the cell's residual variance along the tree's top-M principal directions
              u_i of the residuals, w_c: its mean variance per remaining direction)
  max-z      q.c + the largest of the cell's residuals projected on q's top-M part, plus
             z sqrt(w_c) |q_perp|  (the top-M box's corner, as box8 of bound_pruning.py, with
             a z-sigma estimate on the rest instead of a ball)

For every (layer, KV head, query) each ranking orders the cells; opening them in that order,
the curve of "share of keys opened" against "share of the query's R best keys found" is read
at fixed shares. A ranking that finds more of the best keys at the same share opened lets the
search stop earlier at the same recall. Cells: every `--spacing`-th token a centre, each key
in its nearest centre's cell (what the tree's level-1 cells approximate).
"""
import argparse
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bound_pruning import read_trace  # noqa: E402


def found_at(order, count, best_per_cell, n, total_best, shares):
    """Share of the best keys found when `shares` of the keys are opened, cells in `order`."""
    opened = np.cumsum(count[order]) / n
    found = np.cumsum(best_per_cell[order]) / total_best
    out = []
    for s in shares:
        i = np.searchsorted(opened, s, side="right")  # cells wholly within the share
        out.append(float(found[i - 1]) if i > 0 else 0.0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--spacing", type=int, default=100)
    ap.add_argument("--rescore", type=int, default=64, help="R: a query's best keys to find")
    ap.add_argument("--top", type=int, default=8, help="M: principal directions with their own variance")
    ap.add_argument("--first_layer", type=int, default=2)
    ap.add_argument("--layer_step", type=int, default=2)
    ap.add_argument("--query_step", type=int, default=4)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--out", default="bench/results/cell_ranking")
    a = ap.parse_args()
    if a.spacing < 1 or a.rescore < 1 or a.layer_step < 1 or a.query_step < 1 or a.top < 1:
        ap.error("--spacing, --rescore, --top, --layer_step and --query_step must be at least 1")
    if any(not 0 < s <= 1 for s in a.shares):
        ap.error("--shares must be in (0, 1]")
    os.makedirs(a.out, exist_ok=True)
    rankings = [f"ball-{s}" for s in (0.0, 0.2, 0.4, 0.6, 1.0)]
    rankings += [f"sigma-{z}" for z in (1.0, 2.0, 3.0, 4.0)]
    rankings += [f"max-{z}" for z in (0.0, 1.0, 2.0)]
    rows = []
    for path in a.traces:
        name = os.path.basename(path).split(".")[0]
        pos, keys, queries = read_trace(path)
        layers, kv_heads, _, dim = keys.shape
        group = queries.shape[1] // kv_heads
        n = int(pos[0])
        m = min(a.top, dim - 1)
        if n < a.rescore:
            raise SystemExit(f"{path}: {n} keys before the first query, fewer than --rescore {a.rescore}")
        for layer in range(a.first_layer, layers, a.layer_step):
            for head in range(kv_heads):
                k = keys[layer, head, :n].astype(np.float64)
                centres = k[:: a.spacing]
                d2 = (k * k).sum(1)[:, None] - 2 * k @ centres.T + (centres * centres).sum(1)[None]
                cell = d2.argmin(1)
                res = k - centres[cell]
                _, _, vt = np.linalg.svd(res - res.mean(0), full_matrices=False)
                proj = res @ vt.T  # residuals in the principal basis
                nc = len(centres)
                count = np.bincount(cell, minlength=nc).astype(np.float64)
                radius = np.zeros(nc)
                var_top = np.zeros((nc, m))
                var_rest = np.zeros(nc)
                lo = np.zeros((nc, m))
                hi = np.zeros((nc, m))
                for c in range(nc):
                    idx = np.flatnonzero(cell == c)
                    if idx.size == 0:
                        continue
                    p = proj[idx]
                    radius[c] = np.sqrt((p ** 2).sum(1)).max()
                    var_top[c] = (p[:, :m] ** 2).mean(0)
                    var_rest[c] = (p[:, m:] ** 2).mean(0).mean()
                    lo[c] = p[:, :m].min(0)
                    hi[c] = p[:, :m].max(0)
                for g in range(group):
                    for qi in range(0, queries.shape[2], a.query_step):
                        q = queries[layer, head * group + g, qi].astype(np.float64)
                        s = k @ q
                        thr = np.partition(s, n - a.rescore)[n - a.rescore]
                        best = np.bincount(cell, weights=(s >= thr).astype(np.float64), minlength=nc)
                        total = best.sum()
                        qc, qn, qp = centres @ q, np.linalg.norm(q), vt @ q
                        qperp2 = max(qn * qn - (qp[:m] ** 2).sum(), 0.0)
                        scores = {}
                        for r in rankings:
                            kind, z = r.split("-")
                            z = float(z)
                            if kind == "ball":
                                sc = qc + z * qn * radius
                            elif kind == "sigma":
                                sc = qc + z * np.sqrt(var_top @ (qp[:m] ** 2) + var_rest * qperp2)
                            else:
                                sc = qc + np.maximum(qp[:m] * lo, qp[:m] * hi).sum(1) + \
                                    z * np.sqrt(var_rest * qperp2)
                            sc = np.where(count > 0, sc, -np.inf)
                            scores[r] = found_at(np.argsort(-sc, kind="stable"), count, best, n, total,
                                                 a.shares)
                        for r, f in scores.items():
                            row = {"trace": name, "layer": layer, "head": head, "q_head": head * group + g,
                                   "query": qi, "ranking": r}
                            for sh, v in zip(a.shares, f):
                                row[f"found_at_{sh}"] = round(v, 5)
                            rows.append(row)
            print(f"{name}: layer {layer} of {layers}", flush=True)
    with open(os.path.join(a.out, "cell_ranking.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    cols = [f"found_at_{sh}" for sh in a.shares]
    print(f"\nmean (median) share of each query's {a.rescore} best keys in the cells opened first, "
          f"at {', '.join(str(s) for s in a.shares)} of the keys opened; cells of ~{a.spacing} keys, M = {m}")
    for name in dict.fromkeys(r["trace"] for r in rows):
        print(f"\n| {name}: ranking | " + " | ".join(f"{s:.0%} opened" for s in a.shares) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for rk in rankings:
            sel = [r for r in rows if r["trace"] == name and r["ranking"] == rk]
            vals = [f"{np.mean([r[c] for r in sel]):.3f} ({np.median([r[c] for r in sel]):.3f})" for c in cols]
            print(f"| {rk} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
