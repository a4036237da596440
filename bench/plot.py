#!/usr/bin/python3
"""Plots of the index benchmarks (Debian's python3-matplotlib; no other dependency).

    bench/plot.py RESULTS_DIR

Reads index_quality.csv, index_quality_by_layer.csv and index_speed_<config>.csv from
RESULTS_DIR (whichever exist) and writes next to them:
    index_recall_vs_budget.png   attention recall against token budget, every method
    index_recall_by_layer.png    mean recall per layer at budget 256
    index_search_latency.png     search latency against context, DCI configs vs exact scan
"""
import csv
import glob
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def style(method):
    if method.startswith("oracle"):
        return dict(linestyle="--", marker="x")
    if method.startswith("icecache-dci") or method.startswith("dci"):
        return dict(linestyle="-", marker="o", linewidth=2 if method == "icecache-dci" else 1)
    return dict(linestyle=":", marker="s")


def recall_vs_budget(out):
    path = os.path.join(out, "index_quality.csv")
    if not os.path.exists(path):
        return
    rows = read(path)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in methods:
        pts = sorted((int(r["budget"]), float(r["recall_mean"])) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **style(m))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({int(r["budget"]) for r in rows}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("token budget (sink + selected pages + window)")
    ax.set_ylabel("attention recall (mean)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Attention recall against budget")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "index_recall_vs_budget.png"), dpi=120)


def recall_by_layer(out, budget="256"):
    path = os.path.join(out, "index_quality_by_layer.csv")
    if not os.path.exists(path):
        return
    rows = [r for r in read(path) if r["budget"] == budget]
    if not rows:
        return
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m in methods:
        pts = sorted((int(r["layer"]), float(r["recall_mean"])) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **style(m))
    ax.set_xlabel("layer")
    ax.set_ylabel("attention recall (mean)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Attention recall per layer at budget {budget}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "index_recall_by_layer.png"), dpi=120)


def search_latency(out):
    files = sorted(glob.glob(os.path.join(out, "index_speed_*.csv")))
    if not files:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    scan_drawn = False
    for path in files:
        config = os.path.basename(path)[len("index_speed_"):-len(".csv")]
        rows = read(path)
        xs = [int(r["tokens"]) for r in rows]
        ax.plot(xs, [float(r["dci_search_us"]) for r in rows], marker="o",
                label=f"DCI search ({config})")
        if not scan_drawn:
            ax.plot(xs, [float(r["exact_scan_us"]) for r in rows], marker="s", linestyle=":",
                    color="black", label="exact SIMD scan (same run)")
            scan_drawn = True
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per (layer, KV head)")
    ax.set_ylabel("median latency per decode step (us), GQA group of 4")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Search latency per (layer, KV head), one core")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "index_search_latency.png"), dpi=120)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: bench/plot.py RESULTS_DIR")
    out = sys.argv[1]
    recall_vs_budget(out)
    recall_by_layer(out)
    search_latency(out)
    print(f"plots written to {out}")


if __name__ == "__main__":
    main()
