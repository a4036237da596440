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
    fig, ax = plt.subplots(figsize=(10, 5))
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
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
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
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for m in methods:
        pts = sorted((int(r["layer"]), float(r["recall_mean"])) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **style(m))
    ax.set_xlabel("layer")
    ax.set_ylabel("attention recall (mean)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"Attention recall per layer at budget {budget}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "index_recall_by_layer.png"), dpi=120)


def search_latency(out):
    files = sorted(glob.glob(os.path.join(out, "index_speed_*.csv")))
    if not files:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for i, path in enumerate(files):
        config = os.path.basename(path)[len("index_speed_"):-len(".csv")]
        rows = read(path)
        xs = [int(r["tokens"]) for r in rows]
        color = f"C{i}"
        ax.plot(xs, [float(r["dci_search_us"]) for r in rows], marker="o", color=color,
                label=f"DCI search ({config})")
        ax.plot(xs, [float(r["exact_scan_us"]) for r in rows], marker="s", linestyle=":",
                color=color, label=f"exact scan, same run as {config}")
        ax2.plot(xs, [float(r["speedup"]) for r in rows], marker="o", color=color, label=config)
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("tokens per (layer, KV head)")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median latency of one decode step's search (us)")
    ax.set_title("Search vs exact scan, GQA group of 4, one core")
    ax2.axhline(1.0, color="black", linewidth=0.8)
    ax2.set_ylabel("speed-up over the exact scan (same run)")
    ax2.set_title("Speed-up (the goal is 10x at 32k)")
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
