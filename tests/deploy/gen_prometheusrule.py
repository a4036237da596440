#!/usr/bin/env python3
"""Generates deploy/kubernetes/common/prometheusrule.yaml from deploy/prometheus/icecache.rules.yaml.

The Prometheus Operator loads rules from PrometheusRule objects; plain Prometheus and promtool
load the rules file. One source of truth: the rules file. This script writes the operator's
copy (--write) or checks that the committed copy has exactly the same groups (--check, the
default, run by ctest as deploy_prometheusrule_in_sync).
"""
import argparse
import os
import sys

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RULES = os.path.join(ROOT, "deploy", "prometheus", "icecache.rules.yaml")
TARGET = os.path.join(ROOT, "deploy", "kubernetes", "common", "prometheusrule.yaml")

HEADER = """\
# GENERATED from deploy/prometheus/icecache.rules.yaml by tests/deploy/gen_prometheusrule.py
# --write; do not edit by hand (ctest's deploy_prometheusrule_in_sync fails when they differ).
#
# The Prometheus Operator loads these rules when this object's labels match its
# ruleSelector: kube-prometheus-stack, for one, selects release=<its Helm release name> by
# default; add that label here (or with a kustomize patch) if your Prometheus needs it.
"""


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the longer PromQL expressions) as literal blocks."""


def _str_representer(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def expected_object():
    with open(RULES) as f:
        rules = yaml.safe_load(f)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "icecache",
            "labels": {
                "app.kubernetes.io/name": "icecached",
                "app.kubernetes.io/part-of": "icecache",
            },
        },
        "spec": {"groups": rules["groups"]},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="write the PrometheusRule")
    args = parser.parse_args()
    expected = expected_object()
    if args.write:
        with open(TARGET, "w") as f:
            f.write(HEADER)
            yaml.dump(expected, f, Dumper=_BlockDumper, sort_keys=False, width=100)
        print(f"wrote {os.path.relpath(TARGET, ROOT)}")
        return 0
    with open(TARGET) as f:
        committed = yaml.safe_load(f)
    if committed != expected:
        print(f"{os.path.relpath(TARGET, ROOT)} differs from {os.path.relpath(RULES, ROOT)}: "
              "run tests/deploy/gen_prometheusrule.py --write", file=sys.stderr)
        return 1
    groups = expected["spec"]["groups"]
    print(f"PrometheusRule in sync: {len(groups)} groups, "
          f"{sum(len(g['rules']) for g in groups)} rules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
