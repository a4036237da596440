#!/usr/bin/env python3
"""deploy_prometheus_rules: the Prometheus rules pass Debian's promtool and are complete.

- `promtool check rules deploy/prometheus/icecache.rules.yaml`;
- `promtool test rules deploy/prometheus/tests/icecache.rules.test.yaml` (the unit tests);
- the alerts the deployment promises exist (hit rate low, bandwidth far under the link, memory
  near the limit, errors, daemon down), and the recording rules for hit rate, bandwidth,
  selection latency quantiles and recall, each per node;
- every alert has a severity, a summary, a description and runbook text, a section in
  deploy/README.md, and in the unit tests at least one case where it fires and one where it
  stays quiet.
"""
import os
import re
import sys

import yaml

from deploy_common import Checks, DEPLOY_README, RULE_TESTS, RULES, run

REQUIRED_ALERTS = {
    "IceCacheDaemonDown", "IceCacheHitRateLow", "IceCacheFetchBandwidthLow",
    "IceCacheMemoryNearLimit", "IceCacheServerErrors",
}
REQUIRED_RECORDS = {
    "node:icecache_client_cache_hit_ratio:rate5m",
    "node:icecache_client_fetch_bandwidth_bytes_per_second:rate5m",
    "node:icecache_select_seconds:p50_rate5m",
    "node:icecache_select_seconds:p99_rate5m",
    "node:icecache_select_recall:mean_rate5m",
}


def main():
    c = Checks("deploy_prometheus_rules")
    out = run(["promtool", "check", "rules", RULES])
    c.check(out.returncode == 0 and "SUCCESS" in out.stdout,
            f"promtool check rules: {out.stdout.strip()} {out.stderr.strip()}")
    out = run(["promtool", "test", "rules", RULE_TESTS])
    c.check(out.returncode == 0 and "SUCCESS" in out.stdout,
            f"promtool test rules:\n{out.stdout[-4000:]}{out.stderr[-2000:]}")

    with open(RULES) as f:
        groups = yaml.safe_load(f)["groups"]
    rules = [r for g in groups for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    records = {r["record"]: r for r in rules if "record" in r}
    c.check(REQUIRED_ALERTS <= set(alerts), f"required alerts missing: {REQUIRED_ALERTS - set(alerts)}")
    c.check(REQUIRED_RECORDS <= set(records), f"required recording rules missing: {REQUIRED_RECORDS - set(records)}")
    for name, r in records.items():
        c.check(name.startswith("node:"), f"{name}: recorded per node (level node:)")
        c.check(re.search(r"\bby \((node|node, [a-z_, ]+)\)", r["expr"]) is not None,
                f"{name}: aggregates by node")
        for sel in re.findall(r"\{([^}]*)\}", r["expr"]):
            c.check('job="icecached"' in sel, f"{name}: selector {{{sel}}} restricts to job=icecached")

    with open(RULE_TESTS) as f:
        tests = yaml.safe_load(f)
    firing, quiet = set(), set()
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    with open(DEPLOY_README) as f:
        readme = f.read()
    for name, r in alerts.items():
        c.check(r.get("labels", {}).get("severity") in ("critical", "warning"), f"{name}: severity")
        ann = r.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            c.check(len(ann.get(key, "")) >= 20, f"{name}: annotation {key}")
        c.check(name in firing, f"{name}: a unit test where it fires")
        c.check(name in quiet, f"{name}: a unit test where it stays quiet")
        c.check(re.search(rf"^#+ .*{name}\b", readme, re.M) is not None,
                f"{name}: a runbook section in deploy/README.md")
    print(f"{len(alerts)} alerts, {len(records)} recording rules")
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
