#!/usr/bin/env python3
"""deploy_daemon_flags: the deployment's daemon settings against the real binary.

- deploy/kubernetes/common/icecached.flags names every flag `icecached --helpfull` lists (but
  --tcp, which the containers set from the pod IP), only those, with underscores (the spelling
  a flagfile needs), once each;
- a flag is marked "[default]" in its comment exactly when its value is the binary's default;
- the real daemon accepts the file: started through the image's entrypoint script with the
  file and the overrides this machine needs (a temporary socket, a small memory limit, free
  ports), it serves, reports the file's settings in GetConfig, creates its control socket
  group-writable (the entrypoint's umask) and its attach socket world-connectable, and exits 0
  on SIGTERM.
"""
import argparse
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time

from deploy_common import (Checks, FLAGFILE, ROOT, parse_bytes, parse_duration, read_flagfile,
                           run)

ENTRYPOINT = os.path.join(ROOT, "deploy", "docker", "icecached-entrypoint.sh")
# Defaults that depend on who runs the binary ($ICECACHE_SOCKET, the uid, $XDG_RUNTIME_DIR).
ENVIRONMENT_DEPENDENT = {"socket"}


def binary_flags(icecached):
    """{flag: default} from --helpfull's section of the daemon's own flags."""
    out = run([icecached, "--helpfull"])
    text = out.stdout + out.stderr
    m = re.search(r"Flags from \S*server/main/main\.cc:\n(.*?)(?:\n  Flags from |\nTry --helpfull)",
                  text, re.S)
    if not m:
        raise SystemExit("icecached --helpfull lists no flags of server/main/main.cc")
    flags = {}
    for fm in re.finditer(r"--([a-z0-9_]+) \((.*?)\);\s*default: (.*?);\n", m.group(1) + "\n", re.S):
        default = fm.group(3).strip()
        if default.startswith('"') and default.endswith('"'):
            default = default[1:-1]
        flags[fm.group(1)] = default
    return flags


def same_value(name, a, b):
    """Values equal as the daemon reads them (sizes and durations in any spelling)."""
    if a == b:
        return True
    try:
        if name in ("memory_limit", "client_quota", "segment_size"):
            return parse_bytes(a) == parse_bytes(b)
        if name in ("poll_spin", "shutdown_grace"):
            return abs(parse_duration(a) - parse_duration(b)) < 1e-12
        return float(a) == float(b)
    except ValueError:
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--icecached", required=True)
    parser.add_argument("--cli", required=True)
    args = parser.parse_args()
    c = Checks("deploy_daemon_flags")

    defaults = binary_flags(args.icecached)
    c.check(len(defaults) >= 15, f"parsed {len(defaults)} daemon flags from --helpfull")
    entries = read_flagfile()
    names = [n for n, _, _ in entries]
    c.check(len(names) == len(set(names)), f"a flag appears twice in the flagfile: {names}")
    for n in names:
        c.check("-" not in n, f"--{n}: a flagfile needs underscores (the daemon rejects dashes there)")
    c.equal(sorted(set(names) | {"tcp"}), sorted(defaults),
            "flags in icecached.flags (+ --tcp in the container args) vs icecached --helpfull")
    for name, value, comments in entries:
        if name not in defaults:
            continue
        if name in ENVIRONMENT_DEPENDENT:
            c.check(not any("[default]" in line for line in comments),
                    f"--{name}: its default depends on the uid and environment; set explicitly")
            continue
        marked = any("[default]" in line for line in comments)
        is_default = same_value(name, value, defaults[name])
        c.check(marked == is_default,
                f"--{name}={value}: marked [default]={marked} but the binary's default is "
                f"{defaults[name]!r}")
        c.check(marked or len(comments) >= 1, f"--{name}: a non-default value needs a reason")
    values = {n: v for n, v, _ in entries}

    # The real daemon, through the image's entrypoint, with the file.
    with tempfile.TemporaryDirectory(prefix="icecache-flags-") as tmp:
        os.chmod(tmp, 0o755)
        sock = os.path.join(tmp, "run", "icecached.sock")
        bindir = os.path.join(tmp, "bin")
        os.mkdir(bindir)
        os.symlink(os.path.abspath(args.icecached), os.path.join(bindir, "icecached"))
        env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        env.pop("ICECACHE_UMASK", None)
        log = open(os.path.join(tmp, "daemon.log"), "w+")
        # The overrides come after --flagfile, as in the manifests: later flags win.
        daemon = subprocess.Popen(
            ["/bin/sh", ENTRYPOINT, f"--flagfile={FLAGFILE}", f"--socket={sock}",
             "--memory_limit=256MiB", "--metrics_port=0", "--metrics_host=127.0.0.1",
             "--tcp=127.0.0.1:0", "--workers=2"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            config = None
            deadline = time.time() + 15
            while time.time() < deadline and daemon.poll() is None:
                out = run([args.cli, f"--socket={sock}", "--json", "config"])
                if out.returncode == 0:
                    config = json.loads(out.stdout)
                    break
                time.sleep(0.1)
            if not c.check(config is not None, "the daemon serves with the deployment's flagfile"):
                log.seek(0)
                print(log.read()[-3000:])
                return c.done()
            c.equal(config["recall_sample_every"], int(values["recall_sample_every"]),
                    "GetConfig recall_sample_every")
            c.equal(config["index_preset"], values["index_preset"], "GetConfig index_preset")
            c.equal(config["log_level"], values["log_level"], "GetConfig log_level")
            c.equal(config["shutdown_grace_seconds"], parse_duration(values["shutdown_grace"]),
                    "GetConfig shutdown_grace_seconds")
            c.equal(int(config["memory_limit_bytes"]), 256 << 20,
                    "GetConfig memory_limit_bytes (the override after --flagfile wins)")
            c.equal(int(config["client_quota_bytes"]), 256 << 20,
                    "GetConfig client_quota_bytes (--client_quota=0: the whole limit)")
            c.equal(config["attach_socket_path"], os.path.join(tmp, "run", "icecached.attach.sock"),
                    "GetConfig attach_socket_path (empty --attach_socket: next to --socket)")
            c.check(config.get("tcp_address", "").startswith("127.0.0.1:"),
                    f"GetConfig tcp_address {config.get('tcp_address')!r}")
            status = run([args.cli, f"--socket={sock}", "status"])
            c.check(status.returncode == 0 and "SERVING" in status.stdout,
                    f"icecache status says SERVING: {status.stdout.strip()!r}")
            control = os.stat(sock).st_mode
            c.check(stat.S_ISSOCK(control), "the control socket exists")
            c.check(control & 0o070 == 0o070 and control & 0o002 == 0,
                    f"control socket mode {oct(control & 0o777)}: group rwx (entrypoint umask "
                    "0002, engines of another uid connect as group 10001), not world-writable")
            attach = os.stat(os.path.join(tmp, "run", "icecached.attach.sock")).st_mode
            c.check(attach & 0o666 == 0o666, f"attach socket mode {oct(attach & 0o777)}")
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                rc = daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                rc = daemon.wait()
            c.equal(rc, 0, "daemon exit status after SIGTERM (exec'd by the entrypoint: it got the signal)")
            log.close()
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
