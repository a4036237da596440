#!/usr/bin/python3
"""Plots of the index benchmarks (Debian's python3-matplotlib; no other dependency).

    bench/plot.py RESULTS_DIR

Reads index_quality.csv, index_quality_by_layer.csv and index_speed_<config>.csv from
RESULTS_DIR (whichever exist; alternating runs in RESULTS_DIR/runs/ become index_speed_<label>.csv
medians first) and writes next to them:
    index_recall_vs_budget.png   attention recall against token budget, every method
    index_recall_by_layer.png    mean recall per layer at budget 256
    index_search_latency.png     search latency against context, DCI configs vs exact scan
    index_speedup_rounds.png     alternating runs: each round's speed-up per label and size
    index_build_rate.png         build throughput and insert p99 against context, with the goals
and, from client_decode_<mode>.json and gpu_gather.json:
    client_decode_<mode>.png     decode-step breakdown (select, fetch, attention) against
                                 full attention, and the page-cache hit rate per step
    gpu_gather.png               gather kernel vs bulk and per-page copies
    select_latency.png           from runs/<label>-<i>/client_decode_cpu.json (alternating
                                 runs): select_latency_medians.json and the default's select
                                 (search + tail estimate) against the paper preset's
and, from model_quality.csv, model_quality_by_layer.csv and model_passkey.csv (the real model):
    model_quality_by_text.png, model_top1_by_text.png  per text and the worst text
    model_quality_vs_budget.png  perplexity ratio, top-1 agreement, attention recall and
                                 passkey accuracy against budget, every method
    model_recall_by_layer.png    attention recall per layer at budget 256
    model_quality_by_segment.png from model_quality_by_segment.csv: recall and perplexity
                                 ratio along the continuation, per text and budget
and, from token_step.json and batch_decode.json:
    token_step.png               per token at the 8B shape: daemon CPU against the exact scan,
                                 and the select wait on the critical path, sync vs async
    batch_decode.png             batched decode against single-sequence calls: time per
                                 sequence and tokens per second against batch size
"""
import json
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
    if method == "icecache-service":
        return dict(linestyle="-", marker="D", linewidth=2.5, color="black")
    if method.startswith("icecache-service"):
        return dict(linestyle="-", marker="D", linewidth=2.5, color="tab:red")
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


def context_axes(*axes):
    """Log2 context-size x axis, grid and legend of the index_speed plots."""
    for a in axes:
        a.set_xscale("log", base=2)
        a.set_xlabel("tokens per (layer, KV head)")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)


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
    context_axes(ax, ax2)
    ax.set_yscale("log")
    ax.set_ylabel("median latency of one decode step's search (us)")
    ax.set_title("Search vs exact scan, GQA group of 4, one core")
    ax2.axhline(1.0, color="black", linewidth=0.8)
    ax2.set_ylabel("speed-up over the exact scan (same run)")
    ax2.set_title("Speed-up (the goal is 10x at 32k)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "index_search_latency.png"), dpi=120)


def median(vals):
    """The median (the mean of the two middle values for an even count)."""
    vals = sorted(vals)
    return (vals[len(vals) // 2] + vals[(len(vals) - 1) // 2]) / 2


def median_runs(out):
    """Alternating runs (RESULTS_DIR/runs/index_speed_<label>-<i>.csv, the same command for
    several labels in turn, i = 1, 2, ...): writes index_speed_<label>.csv with each column's
    median over the runs, per context size, so the plots below read it as one config."""
    groups = {}
    for path in glob.glob(os.path.join(out, "runs", "index_speed_*-*.csv")):
        label, _, rep = os.path.basename(path)[len("index_speed_"):-len(".csv")].rpartition("-")
        if rep.isdigit():
            groups.setdefault(label, []).append(read(path))
    for label, runs in sorted(groups.items()):
        fields = list(runs[0][0].keys())
        by_size = {}
        for rows in runs:
            for r in rows:
                by_size.setdefault(r["tokens"], []).append(r)
        with open(os.path.join(out, f"index_speed_{label}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(fields + ["runs"])
            for tokens in sorted(by_size, key=int):
                rs = by_size[tokens]
                med = []
                for k in fields:
                    med.append(f"{median(float(r[k]) for r in rs):.6g}")
                w.writerow(med + [len(rs)])


def round_ratios(out):
    """Alternating runs (RESULTS_DIR/runs/index_speed_<label>-<i>.csv): each run's speed-up over
    the exact scan of the same run, round by round, one panel per context size (a trace's one
    size), one line per label; index_speedup_rounds.png."""
    groups = {}
    for path in glob.glob(os.path.join(out, "runs", "index_speed_*-*.csv")):
        label, _, rep = os.path.basename(path)[len("index_speed_"):-len(".csv")].rpartition("-")
        if rep.isdigit():
            for r in read(path):
                groups.setdefault(r["tokens"], {}).setdefault(label, []).append(
                    (int(rep), float(r["speedup"])))
    if not groups:
        return
    sizes = sorted(groups, key=int)
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.5), squeeze=False)
    for ax, tokens in zip(axes[0], sizes):
        for i, (label, pts) in enumerate(sorted(groups[tokens].items())):
            pts.sort()
            ys = [y for _, y in pts]
            ax.plot([x for x, _ in pts], ys, marker="o", color=f"C{i}",
                    label=f"{label} (median {median(ys):.2f})")
        ax.set_xticks(sorted({x for pts in groups[tokens].values() for x, _ in pts}))
        ax.set_xlabel("round (the labels alternate within a round)")
        ax.set_ylabel("speed-up over the exact scan (same run)")
        ax.set_title(f"{tokens} tokens per (layer, KV head)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "index_speedup_rounds.png"), dpi=120)


def build_rate(out):
    """Build throughput and insert p99 of the daemon's default (index_speed_fast.csv), and of
    the same binary and the build before its speed-up on the same data, run one after the
    other (index_speed_fast-pair.csv, index_speed_fast-before.csv), with the goals; where none
    of those exists, of every index_speed_<config>.csv (e.g. the medians of median_runs)."""
    configs = ("fast", "fast-pair", "fast-before")
    files = [os.path.join(out, f"index_speed_{c}.csv") for c in configs]
    files = [f for f in files if os.path.exists(f)]
    if not files:
        files = sorted(glob.glob(os.path.join(out, "index_speed_*.csv")))
    if not files:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for i, path in enumerate(files):
        config = os.path.basename(path)[len("index_speed_"):-len(".csv")]
        rows = read(path)
        if not rows or "build_tokens_per_s" not in rows[0]:
            continue
        xs = [int(r["tokens"]) for r in rows]
        ax.plot(xs, [float(r["build_tokens_per_s"]) / 1e3 for r in rows], marker="o",
                color=f"C{i}", label=config)
        ax2.plot(xs, [float(r["insert_us_p99"]) / 1e3 for r in rows], marker="o",
                 color=f"C{i}", label=config)
    goals = [(32768, 300), (131072, 150), (524288, 100)]
    ax.scatter([g[0] for g in goals], [g[1] for g in goals], marker="_", s=400, color="black",
               label="goal (tokens/s per core)", zorder=5)
    ax2.axhline(1.0, color="black", linewidth=0.8, label="goal at 128k: 1 ms")
    context_axes(ax, ax2)
    ax.set_yscale("log")
    ax.set_ylabel("build throughput, one core (thousand tokens/s)")
    ax.set_title("Prompt build (median of the timed builds)")
    ax2.set_yscale("log")
    ax2.set_ylabel("insert of one 16-token page, p99 (ms)")
    ax2.set_title("Insert latency after the build")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "index_build_rate.png"), dpi=120)


def select_latency(out):
    """Alternating client_decode runs of several binaries or settings
    (RESULTS_DIR/runs/<label>-<i>/client_decode_cpu.json, each with the configs default,
    no-tail and paper): writes select_latency_medians.json (per label and context, the medians
    over the runs of each config's select, of the tail estimate = default - no-tail, and of
    default / paper) and plots the default's select, split into search and tail estimate,
    beside the paper preset's with the issue's bound (1.5x the paper preset's)."""
    groups = {}
    for path in glob.glob(os.path.join(out, "runs", "*-*", "client_decode_cpu.json")):
        label, _, rep = os.path.basename(os.path.dirname(path)).rpartition("-")
        if rep.isdigit():
            groups.setdefault(label, []).append(path)
    if not groups:
        return

    rows = []
    for label, paths in sorted(groups.items()):
        per_context = {}
        for path in paths:
            with open(path) as f:
                sel = {(b["config"], b["context"]): b["select_us"]
                       for b in json.load(f)["breakdown"]}
            for (config, context), us in sel.items():
                if config != "default" or ("paper", context) not in sel:
                    continue
                r = per_context.setdefault(context, {"default": [], "no-tail": [], "paper": [],
                                                     "tail": [], "ratio": []})
                r["default"].append(us)
                r["paper"].append(sel[("paper", context)])
                r["ratio"].append(us / sel[("paper", context)])
                if ("no-tail", context) in sel:
                    r["no-tail"].append(sel[("no-tail", context)])
                    r["tail"].append(us - sel[("no-tail", context)])
        for context, r in sorted(per_context.items()):
            row = {"label": label, "context": context, "runs": len(r["ratio"]),
                   "ratios": r["ratio"]}
            row.update({f"median_{k}": median(v) for k, v in r.items() if v})
            rows.append(row)
    rows.sort(key=lambda r: (r["context"], r["label"]))
    with open(os.path.join(out, "select_latency_medians.json"), "w") as f:
        json.dump(rows, f, indent=1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = range(len(rows))
    search = [r.get("median_no-tail", r["median_default"]) / 1000 for r in rows]
    tail = [r.get("median_tail", 0) / 1000 for r in rows]
    ax.bar([i - 0.2 for i in x], search, 0.4, label="default: search (no tail)")
    ax.bar([i - 0.2 for i in x], tail, 0.4, bottom=search, label="default: tail estimate")
    ax.bar([i + 0.2 for i in x], [r["median_paper"] / 1000 for r in rows], 0.4, color="gray",
           label="paper preset")
    ax.scatter([i + 0.2 for i in x], [1.5 * r["median_paper"] / 1000 for r in rows],
               marker="_", s=400, color="black", label="1.5x the paper preset (goal)", zorder=5)
    ax.set_xticks(list(x))
    ax.set_xticklabels([f"{r['context'] // 1024}k\n{r['label']}" for r in rows])
    ax.set_ylabel("select per layer, 8 KV heads (ms, median of runs)")
    ax.set_title("Select latency, 8B shape, budget 256")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "select_latency.png"), dpi=120)

def client_decode(out):
    for path in sorted(glob.glob(os.path.join(out, "client_decode_*.json"))):
        with open(path) as f:
            data = json.load(f)
        mode = data["mode"]
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        rows = data["breakdown"]
        labels = [f"{r['context'] // 1024}k\nbudget {r['budget']}" for r in rows]
        x = range(len(rows))
        bottom = [0.0] * len(rows)
        for key, name in (("select_us", "select (daemon)"), ("fetch_us", "fetch (gather)"),
                          ("attention_us", "attention")):
            vals = [r[key] / 1000 for r in rows]
            ax.bar([i - 0.2 for i in x], vals, 0.4, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.bar([i + 0.2 for i in x], [r["full_total_us"] / 1000 for r in rows], 0.4,
               label="full attention, whole context", color="gray")
        top = max([r["full_total_us"] / 1000 for r in rows] + bottom)
        ax.set_ylim(0, top * 1.45)  # room for the legend above the bars
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels)
        ax.set_ylabel("ms per layer and decode step (median)")
        ax.set_title(f"Decode step of one layer, 8B shape, {mode} mode")
        ax.legend(fontsize=8, loc="upper left", ncol=2)
        for h in data["hit_rate"]:
            steps = h["per_step"]
            # A moving mean over 10 steps keeps the plot readable.
            smooth = [sum(steps[max(0, i - 9):i + 1]) / len(steps[max(0, i - 9):i + 1])
                      for i in range(len(steps))]
            ax2.plot(range(len(steps)), smooth, label=f"{h['source']} (steady {h['steady']:.2f})")
        ax2.set_ylim(0, 1)
        ax2.set_xlabel("decode step")
        ax2.set_ylabel("page-cache hit rate (10-step mean)")
        ax2.set_title("Hit rate, budget 256, cache 2x the selection")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"client_decode_{mode}.png"), dpi=120)


def gpu_gather(out):
    path = os.path.join(out, "gpu_gather.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        data = json.load(f)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in sorted({r["pages"] for r in data["rows"]}):
        rows = [r for r in data["rows"] if r["pages"] == n]
        pb = [r["page_bytes"] / 1024 for r in rows]
        ax.plot(pb, [r["gather_gbps"] for r in rows], marker="o", label=f"gather, {n} pages")
        ax.plot(pb, [r["per_page_memcpy_gbps"] for r in rows], marker="x", linestyle=":",
                label=f"memcpy per page, {n} pages")
    bulk = {}
    for r in data["rows"]:
        bulk.setdefault(r["page_bytes"], []).append(r["bulk_gbps"])
    ax.plot([k / 1024 for k in sorted(bulk)], [max(v) for _, v in sorted(bulk.items())],
            color="black", linestyle="--", label="one bulk memcpy (ceiling)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("page size (KiB)")
    ax.set_ylabel("GB/s host -> GPU")
    ax.set_title(f"Scattered page fetch, {data['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gpu_gather.png"), dpi=120)


def model_quality(out):
    path = os.path.join(out, "model_quality.csv")
    if not os.path.exists(path):
        return
    rows = [r for r in read(path) if r["method"] != "full"]
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    passkey = {}
    pk_path = os.path.join(out, "model_passkey.csv")
    if os.path.exists(pk_path):
        for r in read(pk_path):
            if r["method"] == "full":
                continue
            key = (r["method"], int(r["budget"]))
            right, total = passkey.get(key, (0, 0))
            passkey[key] = (right + int(r["correct"]), total + 1)
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.8))
    panels = (("perplexity_ratio", "perplexity / full attention's (1 = equal)"),
              ("top1_agreement", "top-1 next token = full attention's"),
              ("recall", "attention recall (softmax mass attended)"))
    for ax, (key, label) in zip(axes, panels):
        for m in methods:
            budgets = sorted({int(r["budget"]) for r in rows if r["method"] == m})
            means = []
            for b in budgets:
                vals = [float(r[key]) for r in rows if r["method"] == m and int(r["budget"]) == b]
                means.append(sum(vals) / len(vals))
            ax.plot(budgets, means, label=m, **style(m))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token budget")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    axes[0].set_ylim(0.95, min(2.0, axes[0].get_ylim()[1]))
    ax = axes[3]
    for m in methods:
        budgets = sorted(b for (mm, b) in passkey if mm == m)
        if budgets:
            ax.plot(budgets, [passkey[(m, b)][0] / passkey[(m, b)][1] for b in budgets],
                    label=m, **style(m))
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("token budget")
    ax.set_ylabel("passkey retrieval accuracy")
    ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct on real text: IceCache vs baselines and oracles")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "model_quality_vs_budget.png"), dpi=120)

    # Per text, and the worst text per method and budget: perplexity ratio and top-1.
    texts = []
    for r in rows:
        if r["text"] not in texts:
            texts.append(r["text"])
    if texts:
        for key, label, fname, worst in (
                ("perplexity_ratio", "perplexity / full attention's", "model_quality_by_text.png",
                 max),
                ("top1_agreement", "top-1 = full attention's", "model_top1_by_text.png", min)):
            fig, axes = plt.subplots(1, len(texts) + 1, figsize=(4.2 * (len(texts) + 1), 4.4),
                                     squeeze=False)
            for ax, text in zip(axes[0], texts + ["worst text"]):
                for m in methods:
                    budgets = sorted({int(r["budget"]) for r in rows if r["method"] == m})
                    ys = []
                    for b in budgets:
                        vals = [float(r[key]) for r in rows if r["method"] == m and
                                int(r["budget"]) == b and (text == "worst text" or
                                                           r["text"] == text)]
                        ys.append(worst(vals) if vals else float("nan"))
                    ax.plot(budgets, ys, label=m, **style(m))
                ax.set_xscale("log", base=2)
                ax.set_title(text)
                ax.set_xlabel("token budget")
                ax.grid(alpha=0.3)
                if key == "perplexity_ratio":
                    ax.axhline(1.0, color="black", linewidth=0.8)
                    ax.set_ylim(0.9, min(2.0, ax.get_ylim()[1]))
            axes[0][0].set_ylabel(label)
            axes[0][0].legend(fontsize=6)
            fig.suptitle(f"{label}, per text and the worst text (SmolLM2-135M-Instruct)")
            fig.tight_layout()
            fig.savefig(os.path.join(out, fname), dpi=110)

    path = os.path.join(out, "model_quality_by_layer.csv")
    if os.path.exists(path):
        layers = [r for r in read(path) if r["budget"] == "256"]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for m in methods:
            by = {}
            for r in layers:
                if r["method"] == m:
                    by.setdefault(int(r["layer"]), []).append(float(r["recall"]))
            if by:
                ls = sorted(by)
                ax.plot(ls, [sum(by[l]) / len(by[l]) for l in ls], label=m, **style(m))
        ax.set_xlabel("layer")
        ax.set_ylabel("attention recall at budget 256")
        ax.set_title("Recall per layer (mean over texts), real model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "model_recall_by_layer.png"), dpi=120)


def quality_by_segment(out):
    path = os.path.join(out, "model_quality_by_segment.csv")
    if not os.path.exists(path):
        return
    rows = read(path)
    if not rows:
        return
    cases = sorted({(r["text"], int(r["budget"])) for r in rows})
    fig, axes = plt.subplots(2, len(cases), figsize=(6 * len(cases), 7.5), squeeze=False)
    for col, (text, budget) in enumerate(cases):
        methods = []
        for r in rows:
            if r["text"] == text and int(r["budget"]) == budget and r["method"] not in methods:
                methods.append(r["method"])
        for row, (key, label) in enumerate((("recall", "attention recall"),
                                            ("perplexity_ratio", "perplexity / full attention"))):
            ax = axes[row][col]
            for m in methods:
                seg = [r for r in rows if r["text"] == text and int(r["budget"]) == budget
                       and r["method"] == m]
                xs = [(int(r["first_token"]) + int(r["end_token"])) / 2 for r in seg]
                ax.plot(xs, [float(r[key]) for r in seg], label=m, **style(m))
            ax.set_xlabel("position in the sequence (segment middle)")
            ax.set_ylabel(label)
            ax.set_title(f"{text}, budget {budget}")
            ax.grid(alpha=0.3)
            if key == "perplexity_ratio":
                ax.axhline(1.0, color="black", linewidth=0.8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Quality along the continuation (each segment's tokens), real model")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "model_quality_by_segment.png"), dpi=110)


def token_step(out):
    path = os.path.join(out, "token_step.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = json.load(f)["rows"]
    if not rows:
        return
    contexts = sorted({r["context"] for r in rows})
    modes = [m for m in ("sync", "async") if any(r["mode"] == m for r in rows)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / (len(modes) + 1)
    for i, c in enumerate(contexts):
        scan = next(r["scan_cpu_ms_per_token"] for r in rows if r["context"] == c)
        a.bar(i, scan, width, color="lightgray", label="exact scan" if i == 0 else None)
        for j, m in enumerate(modes):
            r = next((r for r in rows if r["context"] == c and r["mode"] == m), None)
            if r is None:
                continue
            a.bar(i + (j + 1) * width, r["daemon_cpu_ms_per_token"], width,
                  color="tab:blue" if m == "sync" else "tab:orange", label=m if i == 0 else None)
            b.bar(i + j * width, r["wait_p50_us"], width,
                  color="tab:blue" if m == "sync" else "tab:orange",
                  label=f"{m} p50" if i == 0 else None)
            b.plot([i + j * width], [r["wait_p99_us"]], "k_", markersize=14)
    for ax, title, unit in ((a, "daemon CPU per token", "ms"),
                            (b, "select wait per layer step (tick: p99)", "us")):
        ax.set_xticks(range(len(contexts)))
        ax.set_xticklabels([f"{c // 1024}k" for c in contexts])
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.legend()
    a.set_yscale("log")
    fig.suptitle("token_step: 8B shape (32 layers x 8 KV heads)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "token_step.png"), dpi=120)
    plt.close(fig)


def batch_decode(out):
    path = os.path.join(out, "batch_decode.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        data = json.load(f)
    rows = data["rows"]
    if not rows:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for path_name, color in (("single", "tab:blue"), ("batch", "tab:orange")):
        rs = sorted((r for r in rows if r["path"] == path_name), key=lambda r: r["batch"])
        xs = [r["batch"] for r in rs]
        a.plot(xs, [r["us_per_sequence"] for r in rs], "o-", color=color, label=path_name)
        b.plot(xs, [r["tokens_per_s"] for r in rs], "o-", color=color, label=path_name)
    for ax, title in ((a, "step time per sequence (us)"), (b, "tokens per second")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"batch_decode: 8B-shaped layer, {data['tokens']} tokens each, "
                 f"{data['mode']} mode")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "batch_decode.png"), dpi=120)
    plt.close(fig)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: bench/plot.py RESULTS_DIR")
    out = sys.argv[1]
    recall_vs_budget(out)
    recall_by_layer(out)
    median_runs(out)
    round_ratios(out)
    search_latency(out)
    build_rate(out)
    client_decode(out)
    select_latency(out)
    gpu_gather(out)
    model_quality(out)
    quality_by_segment(out)
    token_step(out)
    batch_decode(out)
    print(f"plots written to {out}")


if __name__ == "__main__":
    main()
