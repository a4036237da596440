#!/usr/bin/env python3
"""Does packing the most-attended keys into pages of their own lift the layout's ceiling?

The clustered layout (docs/index.md "Clustered pages") cuts Voronoi cells of every
`--spacing`-th key into pages of `--page` keys. A page the oracle keeps for one hot key also
spends its other slots on keys that may carry little mass. This variant takes the keys that
the queries attended most (accumulated softmax mass of the GQA group, H2O / SnapKV style,
from the first half of the trace's continuation queries), packs the top `--hot` share of them
into pages of their own in order of that mass, and clusters the rest as today. Read: the best
pages' attention recall (the oracle of the layout: the best `--pages` pages by the group's
exact mass, plus `--sink` first and `--window` last tokens) on the second half of the
queries, which the importance did not see. In a service the importance would have to come
from the prompt's last queries at the prefill (a new input from the engine); this measures
what it could buy before anyone builds that.

Variants: euclid (the layout as built today), hot<share> for each share, tokens (the best
single tokens: the oracle of any layout).
"""
import argparse
import csv
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bound_pruning import read_trace  # noqa: E402
from query_metric_layout import layout, oracle_recalls  # noqa: E402


def probs(qs, keys, p, scale):
    logits = qs @ keys[: p + 1].T * scale
    logits -= logits.max(-1, keepdims=True)
    pr = np.exp(logits)
    return pr / pr.sum(-1, keepdims=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--spacing", type=int, default=100)
    ap.add_argument("--page", type=int, default=8)
    ap.add_argument("--pages", type=int, default=28)
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--hot", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.03, 0.1])
    ap.add_argument("--layer_step", type=int, default=2)
    ap.add_argument("--query_step", type=int, default=4)
    ap.add_argument("--out", default="bench/results/hot_token_layout")
    a = ap.parse_args()
    if min(a.spacing, a.page, a.pages, a.layer_step, a.query_step) < 1 or a.sink < 0 or a.window < 0:
        ap.error("--spacing, --page, --pages, --layer_step and --query_step must be at least 1; "
                 "--sink and --window at least 0")
    if any(not 0 < h < 1 for h in a.hot):
        ap.error("--hot shares must be in (0, 1)")
    os.makedirs(a.out, exist_ok=True)
    variants = ["euclid"] + [f"hot{h:g}" for h in a.hot] + ["tokens"]
    summary = []
    for path in a.traces:
        name = os.path.basename(path).split(".")[0]
        pos, keys, queries = read_trace(path)
        layers, kv_heads, _, dim = keys.shape
        group = queries.shape[1] // kv_heads
        nq = len(pos)
        train, test = np.arange(nq // 2), np.arange(nq // 2, nq, a.query_step)
        scale = 1.0 / np.sqrt(dim)
        rec = {v: [] for v in variants}
        t0 = time.time()
        for layer in range(2, layers, a.layer_step):
            for head in range(kv_heads):
                kall = keys[layer, head].astype(np.float64)
                k = kall[a.sink :]
                qs = queries[layer, head * group : (head + 1) * group].astype(np.float64)
                imp = np.zeros(len(kall))
                for qi in train:
                    p = int(pos[qi])
                    imp[: p + 1] += probs(qs[:, qi], kall, p, scale).sum(0)
                order = np.argsort(-imp[a.sink :], kind="stable")
                lays = {"euclid": [ids + a.sink for ids in layout(k, a.spacing, a.page)]}
                for h in a.hot:
                    nh = int(round(h * len(k) / a.page)) * a.page
                    hot = order[:nh]
                    rest = np.setdiff1d(np.arange(len(k)), hot)
                    lays[f"hot{h:g}"] = [hot[i : i + a.page] + a.sink for i in range(0, nh, a.page)] + \
                        [rest[ids] + a.sink for ids in layout(k[rest], a.spacing, a.page)]
                for qi in test:
                    p = int(pos[qi])
                    pr = np.zeros((group, len(kall)))
                    pr[:, : p + 1] = probs(qs[:, qi], kall, p, scale)
                    fixed = np.zeros(len(kall), bool)
                    fixed[: a.sink] = True
                    fixed[max(0, p + 1 - a.window) : p + 1] = True
                    for v, r in oracle_recalls(pr, fixed, lays, a.pages, a.page).items():
                        rec[v].append(r)
            print(f"{name} layer {layer} ({time.time() - t0:.0f} s): " +
                  " ".join(f"{v} {np.mean(r):.4f}" for v, r in rec.items()), flush=True)
        base = np.mean(rec["euclid"])
        for v in variants:
            summary.append([name, v, a.page, a.pages, a.sink, a.window, f"{np.mean(rec[v]):.4f}",
                            f"{np.mean(rec[v]) - base:+.4f}", len(rec[v])])
    out = os.path.join(a.out, f"hot_token_layout_p{a.page}_s{a.sink}.csv")
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trace", "variant", "page", "pages", "sink", "window", "mean_recall", "gain_over_euclid", "cases"])
        w.writerows(summary)
    for row in summary:
        print(",".join(str(x) for x in row))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
