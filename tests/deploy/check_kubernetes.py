#!/usr/bin/env python3
"""deploy_kubernetes_manifests: the kustomizations render and are valid Kubernetes objects that
fit together.

1. `kubectl kustomize` of deploy/kubernetes/base and overlays/sidecar with Debian's kubectl
   1.20 (kustomize v2.0.3, the oldest supported); with a newer system kubectl too, which must
   render the same objects (up to the ConfigMap hash suffix, whose algorithm changed).
2. Every built-in object (and deploy/kubernetes/examples/*.yaml) validates with
   kubernetes-validate, strict (no unknown fields), against Kubernetes 1.29 (the oldest the
   manifests target: native sidecars need it, native gRPC probes need 1.24+) and the newest
   schema the package ships. The Prometheus Operator objects (ServiceMonitor, PodMonitor,
   PrometheusRule) are custom resources whose schemas kubernetes-validate does not ship: they
   are checked here field by field against what the operator reads, and the PrometheusRule's
   rules by promtool (deploy_prometheus_rules) and deploy_prometheusrule_in_sync.
3. The objects agree with each other and with the daemon's flags: selectors match the pods,
   ports are named where they are used, probes hit the --tcp port with grpc.health.v1, the
   NetworkPolicies keep the unauthenticated TCP control port closed, memory and CPU match
   --memory_limit and --workers, the engine's uid is admitted (all it needs: the daemon's
   sockets are 0666, so no pod hands out the daemon's group), the node daemon's socket
   directory is searchable by any uid, no capability or host namespace is granted.
"""
import argparse
import copy
import os
import re
import sys

import yaml
import kubernetes_validate

from deploy_common import (Checks, DEPLOY, FLAGFILE, RULES, effective_flags, parse_bytes,
                           parse_cpu, parse_duration, read_flagfile, run)

K8S = os.path.join(DEPLOY, "kubernetes")
SCHEMA_VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
CLUSTER_SCOPED = {"Namespace", "PriorityClass"}
DAEMON_UID = 10001
DAEMON_GID = 10001


def render(kubectl, path):
    out = run([kubectl, "kustomize", path])
    if out.returncode != 0:
        return None, out.stderr.strip()
    # kustomize v2.0.3 sometimes emits empty documents; none are expected here.
    docs = list(yaml.safe_load_all(out.stdout))
    return docs, out.stderr


def normalized(objects):
    """Objects keyed by (kind, name), hash suffixes and cluster-scoped namespaces removed."""
    result = {}
    for obj in objects:
        o = copy.deepcopy(obj)
        text = yaml.safe_dump(o, sort_keys=True)
        text = re.sub(r"icecached-config-[a-z0-9]{10}", "icecached-config-HASH", text)
        o = yaml.safe_load(text)
        if o["kind"] in CLUSTER_SCOPED:
            o["metadata"].pop("namespace", None)  # v2.0.3 sets it; the API server ignores it
        result[(o["kind"], o["metadata"]["name"])] = o
    return result


def by_kind(objects, kind):
    return [o for o in objects if o.get("kind") == kind]


def one(c, objects, kind, name=None):
    found = [o for o in objects if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]
    c.check(len(found) == 1, f"exactly one {kind}{' ' + name if name else ''} (found {len(found)})")
    return found[0] if found else None


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def validate_builtin(c, obj, where):
    for version in SCHEMA_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            c.check(True, "")
        except kubernetes_validate.utils.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            c.check(False, f"{where}: {obj['kind']}/{obj['metadata']['name']} against "
                           f"{version}: {path}: {e.message}")
        except kubernetes_validate.utils.SchemaNotFoundError as e:
            c.check(False, f"{where}: no schema: {e.message}")


def check_crd(c, obj, where):
    kind, name = obj["kind"], obj["metadata"]["name"]
    c.equal(obj.get("apiVersion"), "monitoring.coreos.com/v1", f"{where}: {kind}/{name} apiVersion")
    c.check(set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, f"{where}: {kind}/{name} top-level fields")
    c.check(set(obj["metadata"]) <= {"name", "namespace", "labels", "annotations"},
            f"{where}: {kind}/{name} metadata fields {sorted(obj['metadata'])}")
    spec = obj.get("spec", {})
    if kind in ("ServiceMonitor", "PodMonitor"):
        key = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
        c.check(set(spec) <= {"selector", key, "namespaceSelector", "jobLabel"},
                f"{where}: {kind}/{name} spec fields {sorted(spec)}")
        c.check(isinstance(spec.get("selector", {}).get("matchLabels"), dict)
                and spec["selector"]["matchLabels"], f"{where}: {kind}/{name} selects by labels")
        endpoints = spec.get(key) or []
        c.check(len(endpoints) >= 1, f"{where}: {kind}/{name} has endpoints")
        for ep in endpoints:
            c.check(set(ep) <= {"port", "path", "interval", "scrapeTimeout", "relabelings", "scheme"},
                    f"{where}: {kind}/{name} endpoint fields {sorted(ep)}")
            c.check(isinstance(ep.get("port"), str), f"{where}: {kind}/{name} endpoint port is a name")
            for field in ("interval", "scrapeTimeout"):
                c.check(re.fullmatch(r"[0-9]+(ms|s|m|h)", str(ep.get(field, ""))) is not None,
                        f"{where}: {kind}/{name} {field} {ep.get(field)!r} is a Prometheus duration")
            c.check(parse_duration(ep["scrapeTimeout"]) < parse_duration(ep["interval"]),
                    f"{where}: {kind}/{name} scrapeTimeout below interval")
            relabel = ep.get("relabelings", [])
            for r in relabel:
                c.check(set(r) <= {"sourceLabels", "targetLabel", "replacement", "regex", "action", "separator"},
                        f"{where}: {kind}/{name} relabeling fields {sorted(r)}")
            c.check({"targetLabel": "job", "replacement": "icecached"} in relabel,
                    f"{where}: {kind}/{name} pins job=icecached (the rules select on it)")
            c.check({"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in relabel,
                    f"{where}: {kind}/{name} labels series with the node (the rules aggregate by it)")
    elif kind == "PrometheusRule":
        with open(RULES) as f:
            rules = yaml.safe_load(f)
        c.check(spec.get("groups") == rules["groups"],
                f"{where}: PrometheusRule/{name} carries exactly deploy/prometheus/icecache.rules.yaml")


def container_ports(container):
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def grpc_probe_ports(c, container, where):
    ports = set()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = container.get(probe)
        if not c.check(p is not None and "grpc" in p, f"{where}: {probe} is a native gRPC probe"):
            continue
        ports.add(p["grpc"]["port"])
        if probe == "readinessProbe":
            c.equal(p["grpc"].get("service"), "icecache.v1.IceCache",
                    f"{where}: readiness asks grpc.health.v1 for the IceCache service")
    return ports


def check_daemon_container(c, pod, container, flags, where):
    """The icecached container of a pod (DaemonSet or sidecar)."""
    args = container.get("args", [])
    c.equal(args[:1], ["--flagfile=/etc/icecache/icecached.flags"], f"{where}: first argument")
    values = effective_flags(args, flags)
    tcp = values.get("tcp", "")
    m = re.fullmatch(r"\$\(POD_IP\):([0-9]+)", tcp)
    c.check(m is not None, f"{where}: --tcp binds the pod IP ({tcp!r})")
    env = {e["name"]: e for e in container.get("env", [])}
    c.equal(env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath"),
            "status.podIP", f"{where}: POD_IP from the downward API")
    c.equal(env.get("ICECACHE_SOCKET", {}).get("value"), values.get("socket"),
            f"{where}: ICECACHE_SOCKET (for `kubectl exec ... icecache`) equals --socket")
    ports = container_ports(container)
    probe_ports = grpc_probe_ports(c, container, where)
    if m:
        c.equal(probe_ports, {int(m.group(1))}, f"{where}: gRPC probes target the --tcp port")
        c.check(int(m.group(1)) in ports.values(), f"{where}: the --tcp port is declared")
    c.check(int(values["metrics_port"]) in ports.values(), f"{where}: the metrics port is declared")
    # Mounts: the config, the socket directory of --socket.
    mounts = {vm["mountPath"]: vm["name"] for vm in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod["volumes"]}
    c.check(mounts.get("/etc/icecache") in volumes and "configMap" in volumes[mounts["/etc/icecache"]],
            f"{where}: /etc/icecache is the ConfigMap")
    sock_dir = os.path.dirname(values["socket"])
    c.check(sock_dir in mounts, f"{where}: the socket directory {sock_dir} is a volume")
    # Resources from the flags: memory = limit x 1.1 + 1 GiB (rounded up), cpu = workers.
    res = container.get("resources", {})
    c.equal(res.get("requests"), res.get("limits"), f"{where}: requests = limits (Guaranteed QoS)")
    limit = parse_bytes(res.get("limits", {}).get("memory", "0"))
    need = parse_bytes(values["memory_limit"]) * 1.1 + (1 << 30)
    c.check(need <= limit <= need + (2 << 30),
            f"{where}: memory limit {limit / 2**30:.1f} GiB for --memory_limit="
            f"{values['memory_limit']} (want {need / 2**30:.1f} GiB, at most 2 GiB more)")
    c.equal(parse_cpu(res.get("limits", {}).get("cpu", "0")), float(values["workers"]),
            f"{where}: CPU limit = --workers")
    # Least privilege.
    sc = container.get("securityContext", {})
    c.equal(sc.get("allowPrivilegeEscalation"), False, f"{where}: allowPrivilegeEscalation")
    c.equal(sc.get("readOnlyRootFilesystem"), True, f"{where}: readOnlyRootFilesystem")
    c.equal(sc.get("capabilities"), {"drop": ["ALL"]}, f"{where}: every capability dropped, none added")
    uid = sc.get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
    c.equal(uid, DAEMON_UID, f"{where}: runs as the image's user")
    return values


def engine_admitted(c, pod, engine, values, where):
    """An engine container can attach: its uid is admitted by --allow_uids. That is all it
    needs: the daemon makes both sockets connectable by any uid (0666; deploy_daemon_flags
    checks it against the real binary), so no pod grants the daemon's group for them."""
    psc = pod.get("securityContext", {})
    uid = engine.get("securityContext", {}).get("runAsUser", psc.get("runAsUser"))
    c.check(uid is not None, f"{where}: the engine's uid is stated")
    allowed = [int(u) for u in values.get("allow_uids", "").split(",") if u] or [DAEMON_UID]
    c.check(uid in allowed, f"{where}: engine uid {uid} is in --allow_uids {allowed}")
    c.check(DAEMON_GID not in psc.get("supplementalGroups", []) and psc.get("fsGroup") != DAEMON_GID,
            f"{where}: the pod does not hand out the daemon's group {DAEMON_GID} "
            f"(supplementalGroups {psc.get('supplementalGroups')}, fsGroup {psc.get('fsGroup')}): "
            "the sockets do not need it")
    env = {e["name"]: e.get("value") for e in engine.get("env", [])}
    c.equal(env.get("ICECACHE_SOCKET"), values["socket"], f"{where}: the engine's ICECACHE_SOCKET")
    mounts = {vm["mountPath"]: vm["name"] for vm in engine.get("volumeMounts", [])}
    return mounts.get(os.path.dirname(values["socket"]))


def check_network_policy(c, policy, pod_labels, metrics_port_name, closed_ports, where):
    c.check(matches(policy["spec"]["podSelector"].get("matchLabels"), pod_labels),
            f"{where}: the NetworkPolicy selects the pods")
    c.check("Ingress" in policy["spec"].get("policyTypes", []), f"{where}: ingress is restricted")
    metrics_open = False
    for rule in policy["spec"].get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", [])]
        c.check(ports, f"{where}: every ingress rule names its ports (none opens everything)")
        for closed in closed_ports:
            c.check(closed not in ports, f"{where}: the control port {closed} is not opened")
        if metrics_port_name in ports:
            metrics_open = True
            c.check(rule.get("from") and all("namespaceSelector" in f and "ipBlock" not in f
                                              for f in rule["from"]),
                    f"{where}: metrics only from a selected namespace")
    c.check(metrics_open, f"{where}: the metrics port is open to monitoring")


def check_base(c, objs, flags):
    where = "base"
    ds = one(c, objs, "DaemonSet", "icecached")
    if ds is None:
        return
    pod = ds["spec"]["template"]["spec"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    c.check(matches(ds["spec"]["selector"]["matchLabels"], labels), f"{where}: DaemonSet selector matches its pods")
    c.equal(pod.get("nodeSelector"), {"icecache.io/enabled": "true"}, f"{where}: node label selection")
    for host in ("hostIPC", "hostPID", "hostNetwork"):
        c.check(not pod.get(host, False), f"{where}: no {host}")
    c.equal(pod.get("automountServiceAccountToken"), False, f"{where}: no API token mounted")
    sa = one(c, objs, "ServiceAccount", pod.get("serviceAccountName"))
    pc = one(c, objs, "PriorityClass", pod.get("priorityClassName"))
    c.check(pc is None or 0 < pc["value"] < 2000000000, f"{where}: priority below the system classes")
    c.equal(pod.get("securityContext", {}).get("runAsNonRoot"), True, f"{where}: runAsNonRoot")
    containers = {ct["name"]: ct for ct in pod["containers"]}
    daemon = containers.get("icecached")
    if not c.check(daemon is not None, f"{where}: container icecached"):
        return
    values = check_daemon_container(c, pod, daemon, flags, where)
    c.check(pod.get("terminationGracePeriodSeconds", 30) > parse_duration(values["shutdown_grace"]),
            f"{where}: terminationGracePeriodSeconds exceeds --shutdown_grace")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {vm["mountPath"]: vm["name"] for vm in daemon["volumeMounts"]}
    sock_vol = volumes.get(mounts.get(os.path.dirname(values["socket"])), {})
    c.equal(sock_vol.get("hostPath", {}).get("path"), os.path.dirname(values["socket"]),
            f"{where}: the socket directory is the hostPath engines mount")
    cm_name = volumes.get(mounts.get("/etc/icecache"), {}).get("configMap", {}).get("name")
    cm = one(c, objs, "ConfigMap", cm_name)
    if cm is not None:
        with open(FLAGFILE) as f:
            c.equal(cm["data"].get("icecached.flags"), f.read(), f"{where}: ConfigMap carries icecached.flags")
    # The init container: the only root step, chown/chmod of the socket directory only.
    inits = pod.get("initContainers", [])
    c.equal(len(inits), 1, f"{where}: one init container")
    for init in inits:
        sc = init.get("securityContext", {})
        c.equal(sc.get("capabilities"), {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]},
                f"{where}: init container capabilities")
        c.equal(sc.get("allowPrivilegeEscalation"), False, f"{where}: init allowPrivilegeEscalation")
        command = " ".join(init.get("command", []))
        c.check(f"chown {DAEMON_UID}:{DAEMON_GID}" in command,
                f"{where}: init hands the socket directory to the daemon's user")
        m = re.search(r"chmod ([0-7]{3,4}) (\S+)", command)
        mode = int(m.group(1), 8) if m else 0
        c.check(m is not None and m.group(2) == os.path.dirname(values["socket"])
                and bool(mode & 0o001) and not mode & 0o022,
                f"{where}: init makes the socket directory searchable by engines of any uid and "
                f"writable by the daemon only ({m.group(1) if m else 'no chmod'})")
    # Service -> pods; ServiceMonitor -> Service.
    svc = one(c, objs, "Service", "icecached")
    if svc is not None:
        c.check(matches(svc["spec"]["selector"], labels), f"{where}: Service selects the daemon pods")
        c.equal(svc["spec"].get("clusterIP"), "None", f"{where}: headless Service (every pod scraped)")
        c.equal([p["targetPort"] for p in svc["spec"]["ports"]], ["metrics"],
                f"{where}: the Service exposes the metrics port only")
        c.check(all(p["targetPort"] in container_ports(daemon) for p in svc["spec"]["ports"]),
                f"{where}: Service target ports are container port names")
        sm = one(c, objs, "ServiceMonitor")
        if sm is not None:
            c.check(matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]),
                    f"{where}: ServiceMonitor selects the Service")
            svc_ports = {p["name"] for p in svc["spec"]["ports"]}
            c.check(all(ep["port"] in svc_ports for ep in sm["spec"]["endpoints"]),
                    f"{where}: ServiceMonitor endpoints name Service ports")
    np = one(c, objs, "NetworkPolicy", "icecached")
    if np is not None:
        tcp_port = int(values["tcp"].rsplit(":", 1)[1])
        grpc_names = [n for n, p in container_ports(daemon).items() if p == tcp_port]
        check_network_policy(c, np, labels, "metrics", [tcp_port] + grpc_names, where)
        c.equal(np["spec"].get("egress"), [], f"{where}: no egress (the daemon connects nowhere)")
    ns = one(c, objs, "Namespace", "icecache")
    if ns is not None:
        c.equal(ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce"), "privileged",
                f"{where}: the namespace admits the hostPath")
    for o in objs:
        if o["kind"] not in CLUSTER_SCOPED:
            c.equal(o["metadata"].get("namespace"), "icecache", f"{where}: {o['kind']} namespace")
    one(c, objs, "PrometheusRule")


def check_sidecar(c, objs, flags):
    where = "sidecar"
    kinds = sorted(o["kind"] for o in objs)
    c.equal(kinds, ["ConfigMap", "Deployment", "NetworkPolicy", "PodMonitor", "PrometheusRule"],
            f"{where}: objects")
    dep = one(c, objs, "Deployment")
    if dep is None:
        return
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    c.check(matches(dep["spec"]["selector"]["matchLabels"], labels), f"{where}: selector matches the pods")
    for host in ("hostIPC", "hostPID", "hostNetwork"):
        c.check(not pod.get(host, False), f"{where}: no {host}")
    sidecars = [ct for ct in pod.get("initContainers", []) if ct["name"] == "icecached"]
    if not c.check(len(sidecars) == 1, f"{where}: icecached is an init container"):
        return
    side = sidecars[0]
    c.equal(side.get("restartPolicy"), "Always", f"{where}: native sidecar (restartPolicy Always)")
    values = check_daemon_container(c, pod, side, flags, where)
    c.check(pod.get("terminationGracePeriodSeconds", 30) > parse_duration(values["shutdown_grace"]),
            f"{where}: terminationGracePeriodSeconds exceeds --shutdown_grace")
    volumes = {v["name"]: v for v in pod["volumes"]}
    side_mounts = {vm["mountPath"]: vm["name"] for vm in side["volumeMounts"]}
    sock_vol_name = side_mounts.get(os.path.dirname(values["socket"]))
    c.check("emptyDir" in volumes.get(sock_vol_name, {}), f"{where}: sockets on an emptyDir")
    c.check(not any("hostPath" in v for v in volumes.values()), f"{where}: no hostPath")
    engines = [ct for ct in pod["containers"]]
    c.check(len(engines) >= 1, f"{where}: an engine container")
    for engine in engines:
        vol = engine_admitted(c, pod, engine, values, f"{where}: {engine['name']}")
        c.equal(vol, sock_vol_name, f"{where}: {engine['name']} mounts the sidecar's socket volume")
        caps = engine.get("securityContext", {}).get("capabilities", {})
        c.check(not caps.get("add"), f"{where}: {engine['name']} needs no added capability")
    cm = one(c, objs, "ConfigMap")
    cm_vol = volumes.get(side_mounts.get("/etc/icecache"), {})
    if cm is not None:
        c.equal(cm_vol.get("configMap", {}).get("name"), cm["metadata"]["name"],
                f"{where}: the sidecar mounts the generated ConfigMap")
    pm = one(c, objs, "PodMonitor")
    if pm is not None:
        c.check(matches(pm["spec"]["selector"]["matchLabels"], labels), f"{where}: PodMonitor selects the pods")
        c.check(all(ep["port"] in container_ports(side) for ep in pm["spec"]["podMetricsEndpoints"]),
                f"{where}: PodMonitor scrapes a port of the sidecar")
    np = one(c, objs, "NetworkPolicy")
    if np is not None:
        tcp_port = int(values["tcp"].rsplit(":", 1)[1])
        grpc_names = [n for n, p in container_ports(side).items() if p == tcp_port]
        check_network_policy(c, np, labels, "icecache-metrics", [tcp_port] + grpc_names, where)


def check_example_engine(c, obj, flags):
    where = "examples/engine-with-node-daemon"
    pod = obj["spec"]["template"]["spec"]
    c.equal(pod.get("nodeSelector"), {"icecache.io/enabled": "true"}, f"{where}: runs where a daemon runs")
    values = {n: v for n, v, _ in flags}
    engine = pod["containers"][0]
    vol_name = engine_admitted(c, pod, engine, values, where)
    vol = {v["name"]: v for v in pod["volumes"]}.get(vol_name, {})
    c.equal(vol.get("hostPath"), {"path": os.path.dirname(values["socket"]), "type": "Directory"},
            f"{where}: mounts the daemon's hostPath (type Directory: waits for the daemon)")
    c.check(not engine.get("securityContext", {}).get("capabilities", {}).get("add"),
            f"{where}: no added capability (no IPC_LOCK needed)")
    for host in ("hostIPC", "hostPID", "hostNetwork"):
        c.check(not pod.get(host, False), f"{where}: no {host}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tools", required=True, help="the deploy_tools fixture's directory")
    args = parser.parse_args()
    c = Checks("deploy_kubernetes_manifests")
    env = dict(line.strip().split("=", 1) for line in open(os.path.join(args.tools, "tools.env")) if "=" in line)
    kubectl_debian = env["KUBECTL_DEBIAN"]
    system = run(["sh", "-c", "command -v kubectl"]).stdout.strip()
    kubectls = [kubectl_debian]
    if system and os.path.realpath(system) != os.path.realpath(kubectl_debian):
        kubectls.append(system)
    flags = read_flagfile()
    print(f"kubectl: {', '.join(kubectls)}; schemas: {', '.join(SCHEMA_VERSIONS)}")

    for target, checker in (("base", check_base), ("overlays/sidecar", check_sidecar)):
        renders = []
        for k in kubectls:
            docs, err = render(k, os.path.join(K8S, target))
            if not c.check(docs is not None, f"{target}: `{k} kustomize` renders: {err}"):
                continue
            c.check(all(isinstance(d, dict) and d.get("kind") for d in docs),
                    f"{target}: `{k} kustomize` emits only whole objects")
            renders.append(docs)
        if not renders:
            continue
        objs = renders[0]
        print(f"{target}: {len(objs)} objects: {', '.join(o['kind'] + '/' + o['metadata']['name'] for o in objs)}")
        if len(renders) == 2:
            a, b = normalized(renders[0]), normalized(renders[1])
            c.equal(sorted(a), sorted(b), f"{target}: the same objects from both kustomize versions")
            for key in sorted(set(a) & set(b)):
                c.check(a[key] == b[key], f"{target}: {key} renders the same with both kustomize versions")
        for obj in objs:
            if obj["kind"] in CRD_KINDS:
                check_crd(c, obj, target)
            else:
                validate_builtin(c, obj, target)
        checker(c, objs, flags)

    examples = os.path.join(K8S, "examples")
    for name in sorted(os.listdir(examples)):
        with open(os.path.join(examples, name)) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for obj in docs:
            validate_builtin(c, obj, f"examples/{name}")
            if obj["kind"] == "Deployment" and name == "engine-with-node-daemon.yaml":
                check_example_engine(c, obj, flags)
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
