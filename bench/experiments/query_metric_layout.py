#!/usr/bin/env python3
"""Does cutting pages in the queries' metric lift the page layout's ceiling on a real trace?

The clustered layout (docs/index.md "Clustered pages") groups keys that are close in plain
Euclidean distance: Voronoi cells of every `--spacing`-th key, each cut into pages of
`--page` by a balanced PCA tree. Two keys of one page get the same score from every query
only when their difference is orthogonal to the queries, and the expected squared score gap
of keys k1, k2 over the queries is (k1 - k2)^T M (k1 - k2), M = E[q q^T]. This builds the
same layout on keys mapped by M^(1/2) (and by cheaper forms of it) and reads the best pages'
attention recall (an oracle of the layout: the best `--pages` pages by the group's exact
mass, plus `--sink` first and `--window` last tokens) on queries the metric did not see:
M comes from the first half of the trace's continuation queries, recall from the second.

Variants:
  euclid      the layout as built today
  q-full      M^(1/2) from the training queries of the KV head's group
  q-diag      only M's diagonal (one weight per dimension)
  q-pairs     M's diagonal summed over each RoPE pair (i, i + dim/2), as a prompt's queries
              averaged over rotations would give
  q-mix       M + 0.1 tr(M)/dim I
  q-full-in   M from every query, the evaluation's included (in-sample; an upper bound)
  k-full      the keys' own second moment E[k k^T]^(1/2) (what the daemon knows at the build)
  k-diag      its diagonal
  qmean       the training queries' mean direction plus 0.1 tr(M)/dim I
  tokens      the best single tokens (the oracle of any layout)
"""
import argparse
import csv
import gzip
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bound_pruning import read_trace  # noqa: E402


def first_pc(x):
    c = x - x.mean(0)
    v = c[np.argmax((c * c).sum(1))]
    for _ in range(4):
        v = c.T @ (c @ v)
        nv = np.linalg.norm(v)
        if nv == 0:
            return c[:, 0] * 0
        v /= nv
    return c @ v


def pca_pages(x, ids, page):
    """Balanced PCA tree: ids cut into ceil(m / page) evenly filled pages."""
    m = len(ids)
    p = -(-m // page)
    sizes = [m // p + (1 if i < m % p else 0) for i in range(p)]
    out = []

    def rec(sel, a, b):
        if b - a == 1:
            out.append(ids[sel])
            return
        mid = (a + b) // 2
        left = sum(sizes[a:mid])
        proj = first_pc(x[sel])
        order = np.argsort(proj, kind="stable")
        rec(sel[order[:left]], a, mid)
        rec(sel[order[left:]], mid, b)

    rec(np.arange(m), 0, p)
    return out


def layout(x, spacing, page):
    centres = x[::spacing]
    # nearest centre, in blocks to bound memory
    assign = np.empty(len(x), np.int64)
    cn = (centres * centres).sum(1)
    for s in range(0, len(x), 4096):
        blk = x[s : s + 4096]
        d = cn[None, :] - 2 * blk @ centres.T
        assign[s : s + 4096] = np.argmin(d, 1)
    pages = []
    for c in range(len(centres)):
        ids = np.nonzero(assign == c)[0]
        if len(ids):
            pages += pca_pages(x[ids], ids, page)
    return pages


def oracle_recalls(prob, fixed, layouts, pages, page):
    """The attention recall of each layout's best `pages` pages by the group's exact mass, and
    (key "tokens") of the best `pages * page` single tokens, each with the `fixed` (sink and
    window) positions: prob [group][n] the softmax over every position (0 past the query's),
    fixed [n] bool, layouts {name: [page's token ids]}."""
    free = np.where(fixed, 0, prob.sum(0))
    rec = {}
    for name, ids in layouts.items():
        pm = np.array([free[t].sum() for t in ids])
        top = np.argpartition(-pm, pages)[:pages]
        mask = fixed.copy()
        mask[np.concatenate([ids[t] for t in top])] = True
        rec[name] = float(prob[:, mask].sum(1).mean())
    best = np.argpartition(-free, pages * page)[: pages * page]
    mask = fixed.copy()
    mask[best] = True
    rec["tokens"] = float(prob[:, mask].sum(1).mean())
    return rec


def sqrtm_psd(m):
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--spacing", type=int, default=100)
    ap.add_argument("--page", type=int, default=8)
    ap.add_argument("--pages", type=int, default=28)
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--first_layer", type=int, default=2)
    ap.add_argument("--last_layer", type=int, default=29)
    ap.add_argument("--layer_step", type=int, default=2)
    ap.add_argument("--query_step", type=int, default=4)
    ap.add_argument("--out", default="bench/results/query_metric")
    a = ap.parse_args()
    if min(a.spacing, a.page, a.pages, a.layer_step, a.query_step) < 1 or a.sink < 0 or a.window < 0:
        ap.error("--spacing, --page, --pages, --layer_step and --query_step must be at least 1; "
                 "--sink and --window at least 0")
    os.makedirs(a.out, exist_ok=True)
    variants = ["euclid", "q-full", "q-diag", "q-pairs", "q-mix", "q-full-in", "k-full", "k-diag", "qmean"]
    rows = []
    for path in a.traces:
        name = os.path.basename(path).split(".")[0]
        pos, keys, queries = read_trace(path)
        layers, kv_heads, _, dim = keys.shape
        group = queries.shape[1] // kv_heads
        nq = len(pos)
        train = np.arange(nq // 2)
        test = np.arange(nq // 2, nq, a.query_step)
        scale = 1.0 / np.sqrt(dim)
        t0 = time.time()
        for layer in range(a.first_layer, min(a.last_layer + 1, layers), a.layer_step):
            for head in range(kv_heads):
                kall = keys[layer, head].astype(np.float64)
                k = kall[a.sink :]  # every key: decode tokens join pages as inserts would
                qs = queries[layer, head * group : (head + 1) * group].astype(np.float64)  # [g][nq][d]
                qtr = qs[:, train].reshape(-1, dim)
                qin = qs.reshape(-1, dim)
                m_tr = qtr.T @ qtr / len(qtr)
                m_in = qin.T @ qin / len(qin)
                half = dim // 2
                pair = np.diag(m_tr)[:half] + np.diag(m_tr)[half:]
                transforms = {
                    "euclid": np.eye(dim),
                    "q-full": sqrtm_psd(m_tr),
                    "q-diag": np.diag(np.sqrt(np.diag(m_tr))),
                    "q-pairs": np.diag(np.sqrt(np.concatenate([pair, pair]))),
                    "q-mix": sqrtm_psd(m_tr + 0.1 * np.trace(m_tr) / dim * np.eye(dim)),
                    "q-full-in": sqrtm_psd(m_in),
                    "k-full": sqrtm_psd(k.T @ k / len(k)),
                    "k-diag": np.diag(np.sqrt((k * k).mean(0))),
                    "qmean": sqrtm_psd(np.outer(qtr.mean(0), qtr.mean(0)) + 0.1 * np.trace(m_tr) / dim * np.eye(dim)),
                }
                page_ids = {v: [p + a.sink for p in layout(k @ transforms[v], a.spacing, a.page)] for v in variants}
                if min(len(ids) for ids in page_ids.values()) <= a.pages or a.pages * a.page >= len(kall):
                    raise SystemExit(f"{path}: --pages {a.pages} of {a.page} tokens is not fewer than the "
                                     f"layout's pages or the trace's {len(kall)} tokens")
                for qi in test:
                    p = int(pos[qi])
                    logits = qs[:, qi] @ kall[: p + 1].T * scale  # [g][p+1]
                    logits -= logits.max(1, keepdims=True)
                    prob = np.exp(logits)
                    prob /= prob.sum(1, keepdims=True)
                    probf = np.zeros((group, len(kall)))
                    probf[:, : p + 1] = prob
                    fixed = np.zeros(len(kall), bool)
                    fixed[: a.sink] = True
                    fixed[max(0, p + 1 - a.window) : p + 1] = True
                    rec = oracle_recalls(probf, fixed, page_ids, a.pages, a.page)
                    for v, r in rec.items():
                        rows.append((name, layer, head, p, v, r))
            done = [r for r in rows if r[0] == name]
            med = {v: np.mean([r[5] for r in done if r[4] == v]) for v in variants + ["tokens"]}
            print(f"{name} layer {layer} ({time.time() - t0:.0f} s): " +
                  " ".join(f"{v} {med[v]:.4f}" for v in variants + ["tokens"]), flush=True)
    with gzip.open(os.path.join(a.out, "query_metric_layout.csv.gz"), "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trace", "layer", "kv_head", "position", "variant", "recall"])
        w.writerows(rows)
    with open(os.path.join(a.out, "query_metric_layout_summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trace", "variant", "spacing", "page", "pages", "mean_recall", "gain_over_euclid", "cases"])
        for name in sorted({r[0] for r in rows}):
            means = {v: np.mean([r[5] for r in rows if r[0] == name and r[4] == v]) for v in variants + ["tokens"]}
            n = sum(1 for r in rows if r[0] == name and r[4] == "euclid")
            for v, m in means.items():
                w.writerow([name, v, a.spacing, a.page, a.pages, f"{m:.4f}", f"{m - means['euclid']:+.4f}", n])
            print(name, " ".join(f"{v} {m:.4f}" for v, m in means.items()))

if __name__ == "__main__":
    main()
