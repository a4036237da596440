#!/usr/bin/env python3
"""deploy_observability_e2e: a real icecached, a real client workload and a real Prometheus.

1. Starts icecached (loopback metrics and TCP control listener, --recall-sample-every=1).
2. Probes the plaintext TCP control listener without a token: health and reflection answer;
   every control call, GetStats and GetConfig included, is UNAUTHENTICATED (plaintext TCP
   without --tcp-insecure serves probes only; what deploy/README.md and the NetworkPolicies
   state).
3. Starts Debian's Prometheus in a fresh temporary directory on a free loopback port, scraping
   every second with deploy/prometheus/prometheus.example.yaml's icecached job (its
   relabel_configs as they are; Kubernetes discovery swapped for a file_sd target carrying the
   same __meta_kubernetes_* labels, plus a decoy pod that must be dropped) and loading
   deploy/prometheus/icecache.rules.yaml.
4. Runs the workload (tests/deploy/observability_workload.cc: the real client library in CPU
   mode: prefill, decode steps with cache hits and misses, fetched bytes, selections, recall
   samples, one INVALID_ARGUMENT and one RESOURCE_EXHAUSTED), which reports its own counters.
5. Through Prometheus's HTTP API: every metric the rules and the dashboard use exists; the
   counters equal the workload's; hit rate and bandwidth equal what the workload measured and
   are plausible; every recording rule and every dashboard query returns data (the node
   variable too); every alert expression evaluates and each of its operands returns data;
   Prometheus evaluated every rule without error; IceCacheMemoryRejections fires, nothing
   else that should not.
6. Stops the daemon (SIGTERM, exit 0) and waits for IceCacheDaemonDown to go pending.
Everything it started is stopped and its directory removed, pass or fail.
"""
import argparse
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

from deploy_common import (Checks, DASHBOARD, RULES, SCRAPE_EXAMPLE, free_port, run)

NODE = "e2e-node"
MEMORY_LIMIT = 512 << 20


class Prometheus:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path, **params):
        url = f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)

    def query(self, expr):
        """Instant query; returns (status, [(labels, value)]) with values as floats."""
        try:
            body = self.get("/api/v1/query", query=expr)
        except urllib.error.HTTPError as e:
            return json.load(e).get("error", str(e)), []
        if body["status"] != "success":
            return body.get("error", "error"), []
        data = body["data"]
        if data["resultType"] == "scalar":
            return "success", [({}, float(data["result"][1]))]
        return "success", [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def value(self, expr):
        status, result = self.query(expr)
        return result[0][1] if status == "success" and len(result) == 1 else None


def wait_for(what, fn, timeout, interval=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def split_top_level(expr):
    """Operands of a PromQL expression's top-level comparisons and set operators
    ('A / B > 0.9 and C > 1' -> ['A / B', '0.9', 'C', '1'])."""
    parts, depth, start, i, quote = [], 0, 0, 0, None
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif depth == 0:
            m = re.match(r"(>=|<=|==|!=|>|<)|\s(and|or|unless)\s", expr[i:])
            if m:
                parts.append(expr[start:i])
                i += m.end()
                start = i
                continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def operands(expr):
    """The parts of an alert expression that must return data while it is quiet."""
    out = []
    for part in split_top_level(expr):
        if re.fullmatch(r"[0-9.eE+-]+", part):
            continue
        m = re.fullmatch(r"absent\((.*)\)", part, re.S)
        out.append(m.group(1) if m else part)
    return out


def finite(result):
    return [v for _, v in result if not math.isnan(v) and not math.isinf(v)]


def dashboard_queries():
    with open(DASHBOARD) as f:
        d = json.load(f)
    for p in d["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "2m").replace('node=~"$node"', 'node=~".*"')
            yield p["title"], t["refId"], expr
    node_var = next(v for v in d["templating"]["list"] if v["name"] == "node")
    yield "variable node", "query", node_var["definition"]


def prometheus_config(tmp, metrics_port):
    """The example's scrape job with file_sd in place of Kubernetes discovery."""
    with open(SCRAPE_EXAMPLE) as f:
        example = yaml.safe_load(f)
    job = next(j for j in example["scrape_configs"] if j["job_name"] == "icecached")
    job = dict(job)
    job.pop("kubernetes_sd_configs")
    targets = os.path.join(tmp, "targets.json")
    job["file_sd_configs"] = [{"files": [targets], "refresh_interval": "1s"}]
    job["scrape_interval"] = "1s"
    job["scrape_timeout"] = "900ms"
    meta = {
        "__meta_kubernetes_namespace": "icecache",
        "__meta_kubernetes_pod_name": "icecached-e2e",
        "__meta_kubernetes_pod_node_name": NODE,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": "icecached",
        "__meta_kubernetes_pod_container_port_name": "metrics",
    }
    # An engine pod's own "metrics" port: not the daemon's, must be dropped by the relabeling.
    decoy = dict(meta, __meta_kubernetes_pod_name="llm-engine-e2e",
                 __meta_kubernetes_pod_label_app_kubernetes_io_name="llm-engine")
    with open(targets, "w") as f:
        json.dump([{"targets": [f"127.0.0.1:{metrics_port}"], "labels": meta},
                   {"targets": [f"127.0.0.1:{metrics_port}"], "labels": decoy}], f)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [RULES],
        "scrape_configs": [job],
    }
    path = os.path.join(tmp, "prometheus.yml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def stop(proc, timeout=15):
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else None
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--icecached", required=True)
    parser.add_argument("--cli", required=True)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    c = Checks("deploy_observability_e2e")
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="icecache-e2e-")
    daemon = prom = workload = None
    logs = {}

    def log(name):
        logs[name] = open(os.path.join(tmp, f"{name}.log"), "w+")
        return logs[name]

    try:
        # 1. The daemon.
        sock = os.path.join(tmp, "run", "icecached.sock")
        daemon = subprocess.Popen(
            [args.icecached, f"--socket={sock}", "--metrics-port=0", "--metrics-host=127.0.0.1",
             "--tcp=127.0.0.1:0", f"--memory-limit={MEMORY_LIMIT}", "--recall-sample-every=1",
             "--workers=2", "--shutdown-grace=2s"],
            stdout=log("daemon"), stderr=subprocess.STDOUT)

        def config():
            if daemon.poll() is not None:
                raise RuntimeError(f"icecached exited with status {daemon.returncode}")
            out = run([args.cli, f"--socket={sock}", "--json", "config"])
            return json.loads(out.stdout) if out.returncode == 0 else None
        cfg = wait_for("icecached to serve", config, 15)
        metrics_port, tcp = cfg["metrics_port"], cfg["tcp_address"]
        print(f"icecached: metrics 127.0.0.1:{metrics_port}, control TCP {tcp} ({time.time() - t0:.1f}s)", flush=True)

        # 2. What the TCP listener answers without a token.
        out = run([args.workload, "--mode=tcp-exposure", f"--address={tcp}"], timeout=30)
        if c.check(out.returncode == 0, f"tcp-exposure probe ran: {out.stderr.strip()}"):
            exposure = json.loads(out.stdout)
            codes = exposure["codes"]
            want = {"Health.Check": "SERVING", "Health.Check(icecache.v1.IceCache)": "SERVING",
                    "GetStats": "UNAUTHENTICATED", "GetConfig": "UNAUTHENTICATED",
                    "ServerReflection.ListServices": "OK",
                    "CreateSequence": "UNAUTHENTICATED", "ListSequences": "UNAUTHENTICATED",
                    "GetSequence": "UNAUTHENTICATED", "DropSequence": "UNAUTHENTICATED",
                    "CreateSequence(made-up token)": "UNAUTHENTICATED"}
            c.equal(codes, want, "TCP control listener without a token")
            c.check({"icecache.v1.IceCache", "grpc.health.v1.Health"} <= set(exposure["reflection_services"]),
                    f"reflection lists the services: {exposure['reflection_services']}")
            print(f"TCP without a token: {codes}", flush=True)

        # 3. Prometheus.
        prom_port = free_port()
        prom_config = prometheus_config(tmp, metrics_port)
        out = run(["promtool", "check", "config", prom_config])
        c.check(out.returncode == 0, f"promtool check config (the example's job, file_sd): "
                                     f"{out.stdout.strip()} {out.stderr.strip()}")
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={prom_config}", f"--storage.tsdb.path={tmp}/data",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn",
             "--storage.tsdb.retention.time=1h"],
            stdout=log("prometheus"), stderr=subprocess.STDOUT, cwd=tmp)
        p = Prometheus(prom_port)

        def ready():
            if prom.poll() is not None:
                raise RuntimeError(f"prometheus exited with status {prom.returncode}")
            try:
                with urllib.request.urlopen(f"{p.base}/-/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_for("Prometheus to be ready", ready, 20)
        print(f"prometheus ready ({time.time() - t0:.1f}s)", flush=True)
        wait_for("the first scrape", lambda: p.value(f'up{{job="icecached", node="{NODE}"}}') == 1, 20)
        targets = p.get("/api/v1/targets")["data"]
        active = [t["labels"] for t in targets["activeTargets"]]
        c.equal(len(active), 1, "the example's relabeling keeps the daemon's target only")
        c.equal({k: active[0].get(k) for k in ("job", "node", "namespace", "pod")} if active else {},
                {"job": "icecached", "node": NODE, "namespace": "icecache", "pod": "icecached-e2e"},
                "target labels from the example's relabeling")
        c.equal(len(targets["droppedTargets"]), 1, "the decoy engine port is dropped")
        print(f"prometheus: 127.0.0.1:{prom_port}, scraping since {time.time() - t0:.1f}s", flush=True)

        # 4. The workload.
        wjson = os.path.join(tmp, "workload.json")
        workload = subprocess.Popen([args.workload, "--mode=workload", f"--socket={sock}", f"--out={wjson}"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log("workload"),
                                    text=True)
        readable, _, _ = select.select([workload.stdout], [], [], 90)
        line = workload.stdout.readline().strip() if readable else "(no answer in 90 s)"
        if not c.equal(line, "ready", "the workload ran"):
            logs["workload"].seek(0)
            print(logs["workload"].read()[-3000:])
            return c.done()
        with open(wjson) as f:
            w = json.load(f)
        print(f"workload: {w}", flush=True)
        selects = w["steps"] * w["offloaded_layers"]
        wait_for("the workload's last counters in Prometheus",
                 lambda: p.value('sum(icecache_client_decode_steps_total{job="icecached"})') == w["decode_steps"]
                 and p.value('sum(icecache_select_seconds_count{job="icecached"})') == selects
                 and p.value('sum(icecache_sequences{job="icecached"})') == 1, 20)
        # Two more rule evaluations (every second) after the last scrape.
        time.sleep(2.5)

        # 5a. Every metric the rules and the dashboard use exists.
        with open(RULES) as f:
            groups = yaml.safe_load(f)["groups"]
        rules = [r for g in groups for r in g["rules"]]
        exprs = [r["expr"] for r in rules] + [e for _, _, e in dashboard_queries()]
        names = set()
        for e in exprs:
            # Metric names, not the recording rules' level:metric:operation names.
            names |= set(re.findall(r"(?<![\w:])(icecache_[a-z_]+)(?![\w:])", e))
        missing = sorted(n for n in names if not p.query(f'count({{__name__="{n}", job="icecached"}})')[1])
        c.check(not missing, f"series the rules and the dashboard use, missing from the daemon: {missing}")
        print(f"{len(names)} metric names used by the rules and the dashboard, all scraped", flush=True)

        # 5b. The counters equal the workload's; hit rate and bandwidth plausible.
        def total(metric):
            return p.value(f'sum({metric}{{job="icecached", node="{NODE}"}})')
        c.equal(total("icecache_client_cache_hits_total"), w["cache_hits"], "hits in Prometheus")
        c.equal(total("icecache_client_cache_misses_total"), w["cache_misses"], "misses in Prometheus")
        c.equal(total("icecache_client_fetched_bytes_total"), w["fetched_bytes"], "fetched bytes")
        c.equal(total("icecache_client_decode_steps_total"), w["decode_steps"], "decode steps")
        c.equal(w["decode_steps"], w["steps"] * w["layers"], "decode steps = steps x layers")
        c.equal(total("icecache_select_seconds_count"), selects, "selections = steps x offloaded layers")
        c.equal(total("icecache_clients"), 1, "attached clients while the workload holds")
        c.equal(total("icecache_sequences"), 1, "live sequences while the workload holds")
        c.equal(total("icecache_memory_limit_bytes"), MEMORY_LIMIT, "memory limit")
        c.check((total("icecache_memory_used_bytes") or 0) > 0, "memory promised to the live sequence")
        c.check((total("icecache_arena_bytes") or 0) > 0, "arena bytes")
        recalls = total("icecache_select_recall_count") or 0
        c.check(0 < recalls <= selects * w["q_heads"], f"recall samples {recalls} in (0, {selects * w['q_heads']}]")
        c.check(total("icecache_memory_rejections_total") == w["resource_exhausted_calls"],
                "memory rejections = the workload's RESOURCE_EXHAUSTED")
        want_hit = w["cache_hits"] / (w["cache_hits"] + w["cache_misses"])
        hit = p.value(f'node:icecache_client_cache_hit_ratio:rate5m{{node="{NODE}"}}')
        c.check(hit is not None and abs(hit - want_hit) < 1e-9,
                f"recorded hit rate {hit} = the workload's hits / (hits + misses) {want_hit}")
        c.check(0.05 < want_hit < 0.99 and w["cache_hits"] > 0 and w["cache_misses"] > 0,
                f"hit rate {want_hit:.3f}: both hits and misses (repeated queries hit, new pages miss)")
        fetch_seconds = w["fetch_nanoseconds"] * 1e-9
        want_bw = w["fetched_bytes"] / fetch_seconds if fetch_seconds else float("nan")
        bw = p.value(f'node:icecache_client_fetch_bandwidth_bytes_per_second:rate5m{{node="{NODE}"}}')
        c.check(bw is not None and abs(bw - want_bw) <= 1e-6 * want_bw,
                f"recorded bandwidth {bw} = the workload's fetched bytes / fetch seconds {want_bw}")
        c.check(bw is not None and 1e7 < bw < 2e11,
                f"bandwidth {bw} B/s plausible for CPU-mode page copies (10 MB/s .. 200 GB/s)")
        mean_recall = p.value(f'node:icecache_select_recall:mean_rate5m{{node="{NODE}"}}')
        c.check(mean_recall is not None and 0.2 < mean_recall <= 1.0, f"mean sampled recall {mean_recall}")
        p50 = p.value(f'node:icecache_select_seconds:p50_rate5m{{node="{NODE}"}}')
        p99 = p.value(f'node:icecache_select_seconds:p99_rate5m{{node="{NODE}"}}')
        c.check(p50 is not None and p99 is not None and 0 < p50 <= p99 < 10,
                f"selection latency p50 {p50} <= p99 {p99} (seconds)")
        status, errors = p.query(f'node:icecache_request_errors:rate5m{{node="{NODE}"}} > 0')
        c.equal(sorted(m["code"] for m, _ in errors), ["INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"],
                "error codes Prometheus saw (the workload's two deliberate failures)")
        print(f"measured: hit rate {want_hit:.4f} (Prometheus {hit}), bandwidth {want_bw / 1e9:.3f} GB/s "
              f"(Prometheus {bw / 1e9 if bw else bw} GB/s), recall {mean_recall}, select p50 {p50} s "
              f"p99 {p99} s", flush=True)

        # 5c. Every recording rule and every dashboard query returns data.
        for r in rules:
            if "record" not in r:
                continue
            status, result = p.query(r["expr"])
            c.check(status == "success" and finite(result), f"recording rule {r['record']}: {status}, {result[:3]}")
            status, result = p.query(r["record"])
            c.check(status == "success" and result and all(m.get("node") == NODE for m, _ in result),
                    f"Prometheus recorded {r['record']} per node: {result[:3]}")
        for title, ref, expr in dashboard_queries():
            if expr.startswith("label_values("):
                m = re.fullmatch(r"label_values\((.*), (\w+)\)", expr)
                values = p.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": m.group(1)})["data"]
                c.equal(values, [NODE], f"dashboard {title}: values")
                continue
            status, result = p.query(expr)
            c.check(status == "success" and finite(result), f"dashboard {title!r} {ref}: {status}, {result[:3]}")
            if "by (node" in expr:
                c.check(all(m.get("node") == NODE for m, _ in result), f"dashboard {title!r} {ref}: per node")

        # 5d. Alerts: each expression evaluates; each operand returns data.
        for r in rules:
            if "alert" not in r:
                continue
            status, _ = p.query(r["expr"])
            c.equal(status, "success", f"alert {r['alert']}: its expression evaluates")
            for operand in operands(r["expr"]):
                status, result = p.query(operand)
                c.check(status == "success" and result, f"alert {r['alert']}: operand {operand!r} returns data")
        api_rules = [rule for g in p.get("/api/v1/rules")["data"]["groups"] for rule in g["rules"]]
        c.equal(len(api_rules), len(rules), "rules Prometheus loaded")
        bad = [(x.get("name"), x.get("lastError")) for x in api_rules if x.get("health") != "ok"]
        c.check(not bad, f"rules Prometheus evaluated with errors: {bad}")
        alerts = {a["labels"]["alertname"]: a["state"] for a in p.get("/api/v1/alerts")["data"]["alerts"]}
        c.equal(alerts.get("IceCacheMemoryRejections"), "firing",
                "IceCacheMemoryRejections fires for the workload's deliberate rejection")
        # Quality alerts may go pending on this small synthetic workload (its recall and hit
        # rate are what they are); nothing about the daemon's health may be active.
        quality = {"IceCacheMemoryRejections", "IceCacheRecallLow", "IceCacheHitRateLow",
                   "IceCacheFetchBandwidthLow"}
        c.check(set(alerts) <= quality, f"no health alert active: {alerts}")
        for name, state in alerts.items():
            expr = next(r["expr"] for r in rules if r.get("alert") == name)
            c.check(p.query(expr)[1], f"{name} is {state}: its expression returns data now")
        print(f"active alerts: {alerts}", flush=True)

        # 6. The workload leaves; the daemon stops; Prometheus notices.
        workload.stdin.close()
        c.equal(workload.wait(timeout=20), 0, "workload exit status")
        c.equal(stop(daemon, timeout=20), 0, "icecached exit status after SIGTERM")

        def daemon_down_pending():
            a = p.get("/api/v1/alerts")["data"]["alerts"]
            return [x for x in a if x["labels"]["alertname"] == "IceCacheDaemonDown"
                    and x["labels"].get("node") == NODE and x["state"] == "pending"]
        try:
            wait_for("IceCacheDaemonDown pending", daemon_down_pending, 15)
            c.check(True, "")
        except TimeoutError as e:
            c.check(False, str(e))
        c.equal(p.value(f'up{{job="icecached", node="{NODE}"}}'), 0, "up after the daemon stopped")
    except (TimeoutError, OSError, subprocess.TimeoutExpired, RuntimeError) as e:
        c.check(False, f"{type(e).__name__}: {e}")
        for name, f in logs.items():
            f.seek(0)
            print(f"--- {name} log (tail) ---\n{f.read()[-2000:]}")
    finally:
        if workload is not None and workload.poll() is None:
            workload.kill()
            workload.wait()
        stop(daemon)
        stop(prom)
        for f in logs.values():
            f.close()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"took {time.time() - t0:.1f}s")
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
