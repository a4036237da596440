#!/usr/bin/env python3
"""deploy_grafana_dashboard: deploy/grafana/icecache-dashboard.json is an importable dashboard
with what the deployment promises.

- valid JSON with a uid, a title and a schemaVersion; a data source variable (type datasource,
  Prometheus) that every panel and every query uses, and a node variable fed by it;
- unique panel ids, panels inside the 24-column grid and not overlapping;
- every metric selector restricted to job="icecached" and node=~"$node"; every time-series
  panel aggregates per node and names the node in its legend;
- panels for hit rate, transfer bandwidth, selection latency p50 and p99, sampled attention
  recall, memory used and limit, sequences and clients, errors by code.
(Whether each expression returns data from a real daemon: deploy_observability_e2e.)
"""
import json
import re
import sys

from deploy_common import Checks, DASHBOARD

DS_REF = {"type": "prometheus", "uid": "${datasource}"}

# title fragment -> what its queries must contain
REQUIRED_PANELS = {
    "hit rate per node": ["icecache_client_cache_hits_total", "icecache_client_cache_misses_total"],
    "transfer bandwidth per node": ["icecache_client_fetched_bytes_total",
                                    "icecache_client_fetch_seconds_total"],
    "selection latency p50 / p99 per node": ["histogram_quantile(0.5,", "histogram_quantile(0.99,",
                                             "icecache_select_seconds_bucket"],
    "sampled attention recall per node": ["icecache_select_recall"],
    "memory used and limit per node": ["icecache_memory_used_bytes", "icecache_memory_limit_bytes"],
    "sequences and clients per node": ["icecache_sequences", "icecache_clients"],
    "errors by code per node": ["by (node, code)", "icecache_rpc_requests_total",
                                "icecache_data_requests_total"],
}


def selectors(expr):
    """The label matchers of every selector in a PromQL expression."""
    return re.findall(r"\{([^{}]*)\}", expr)


def main():
    c = Checks("deploy_grafana_dashboard")
    with open(DASHBOARD) as f:
        d = json.load(f)
    for key in ("uid", "title", "schemaVersion", "panels", "templating"):
        c.check(key in d, f"dashboard field {key}")
    c.check(d.get("id") is None, "no instance id (importable into any Grafana)")
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables.get("datasource", {})
    c.equal((ds.get("type"), ds.get("query")), ("datasource", "prometheus"),
            "variable datasource picks a Prometheus data source")
    node = variables.get("node", {})
    c.equal(node.get("datasource"), DS_REF, "variable node queries ${datasource}")
    c.check("label_values(" in str(node.get("query")) and ", node)" in str(node.get("query")),
            f"variable node lists the node label: {node.get('query')}")
    c.check(node.get("includeAll") and node.get("allValue") == ".*" and node.get("multi"),
            "variable node: multi-select with All = .*")

    ids, cells = set(), {}
    panels = [p for p in d["panels"] if p["type"] != "row"]
    for p in d["panels"]:
        c.check(p["id"] not in ids, f"panel id {p['id']} unique")
        ids.add(p["id"])
        g = p["gridPos"]
        c.check(g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, f"panel {p['title']!r} inside the grid")
        overlaps = {cells[(x, y)] for x in range(g["x"], g["x"] + g["w"])
                    for y in range(g["y"], g["y"] + g["h"]) if (x, y) in cells}
        c.check(not overlaps, f"panel {p['title']!r} overlaps {sorted(overlaps)}")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                cells[(x, y)] = p["title"]
    for p in panels:
        title = p["title"]
        c.equal(p.get("datasource"), DS_REF, f"{title!r}: panel data source")
        c.check(p.get("targets"), f"{title!r}: has queries")
        c.check(p.get("fieldConfig", {}).get("defaults", {}).get("unit"), f"{title!r}: has a unit")
        for t in p.get("targets", []):
            c.equal(t.get("datasource"), DS_REF, f"{title!r} {t.get('refId')}: query data source")
            expr = t.get("expr", "")
            for sel in selectors(expr):
                c.check('job="icecached"' in sel and 'node=~"$node"' in sel,
                        f"{title!r}: selector {{{sel}}} filters job and $node")
            c.check("[$__rate_interval]" in expr or "rate(" not in expr,
                    f"{title!r}: rates over $__rate_interval")
            if p["type"] == "timeseries":
                c.check(re.search(r"\bby \(node\b", expr) is not None, f"{title!r}: aggregates by node: {expr}")
                c.check("{{node}}" in t.get("legendFormat", ""), f"{title!r}: legend names the node")
    titles = {p["title"].lower(): p for p in panels}
    for fragment, needles in REQUIRED_PANELS.items():
        match = [t for t in titles if fragment in t]
        if not c.check(match, f"a panel titled ...{fragment}..."):
            continue
        exprs = " ".join(t["expr"] for t in titles[match[0]]["targets"])
        for needle in needles:
            c.check(needle in exprs, f"panel {match[0]!r} queries {needle}")
    print(f"{len(panels)} panels, {sum(len(p['targets']) for p in panels)} queries")
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
