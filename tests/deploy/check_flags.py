#!/usr/bin/env python3
"""deploy_daemon_flags: the deployment's daemon settings against the real binary.

- deploy/kubernetes/common/icecached.flags names every flag of the daemon that
  `icecached --helpfull` lists (but --tcp, which the containers set from the pod IP), only
  those, once each, spelled with underscores throughout (as --help prints them; the daemon
  accepts dashes in a flagfile too);
- `icecached --help` lists exactly those daemon flags too (--memory_limit among them), and no
  others;
- a flag is marked "[default]" in its comment exactly when its value is the binary's default;
- the real daemon accepts the file: started through the image's entrypoint script, under the
  usual umask 022, with the file and the overrides this machine needs (a temporary socket, a
  small memory limit, free ports), it serves, reports the file's settings in GetConfig, makes
  both its control socket and its attach socket connectable by any uid (mode & 0666 == 0666:
  engines of another uid need nothing but --allow_uids), and exits 0 on SIGTERM;
- the same with a copy of the file whose flag names are spelled with dashes.
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


# The daemon's own flags: those defined under server/main/ (not Abseil's, gRPC's, ...).
DAEMON_SOURCES = re.compile(r"(^|/)server/main/[^/]+$")


def help_sections(icecached, help_flag):
    """{source file: {flag: default}} of each "Flags from FILE:" section `icecached <help_flag>`
    prints."""
    out = run([icecached, help_flag])
    text = out.stdout + out.stderr
    sections = {}
    for m in re.finditer(r"\n  Flags from (\S+):\n(.*?)(?=\n  Flags from |\nTry --helpfull|\Z)",
                         text, re.S):
        flags = {}
        for fm in re.finditer(r"--([a-z0-9_]+) \((.*?)\);\s*default: (.*?);\n", m.group(2) + "\n",
                              re.S):
            default = fm.group(3).strip()
            if default.startswith('"') and default.endswith('"'):
                default = default[1:-1]
            flags[fm.group(1)] = default
        sections[m.group(1)] = flags
    return sections


def daemon_flags(sections):
    """{flag: default} of the daemon's own flags among help_sections()."""
    return {name: default for source, flags in sections.items() if DAEMON_SOURCES.search(source)
            for name, default in flags.items()}


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


def connectable_by_anyone(mode):
    """A unix socket of this mode accepts connect() from every uid (connect needs write)."""
    return mode & 0o666 == 0o666


def serve_with(c, args, flagfile, values, what):
    """Starts the real daemon through the image's entrypoint with `flagfile` (plus the
    overrides this machine needs), checks it serves with the file's settings and both sockets
    connectable by any uid, and stops it with SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="icecache-flags-") as tmp:
        os.chmod(tmp, 0o755)
        sock = os.path.join(tmp, "run", "icecached.sock")
        attach_sock = os.path.join(tmp, "run", "icecached.attach.sock")
        bindir = os.path.join(tmp, "bin")
        os.mkdir(bindir)
        os.symlink(os.path.abspath(args.icecached), os.path.join(bindir, "icecached"))
        env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        log = open(os.path.join(tmp, "daemon.log"), "w+")
        # The overrides come after --flagfile, as in the manifests: later flags win. umask 022
        # (container runtimes' default, and the entrypoint sets none): the sockets' modes must
        # not depend on it.
        daemon = subprocess.Popen(
            ["/bin/sh", ENTRYPOINT, f"--flagfile={flagfile}", f"--socket={sock}",
             "--memory_limit=256MiB", "--metrics_port=0", "--metrics_host=127.0.0.1",
             "--tcp=127.0.0.1:0", "--workers=2"],
            stdout=log, stderr=subprocess.STDOUT, env=env, umask=0o022)
        try:
            config = None
            deadline = time.time() + 15
            while time.time() < deadline and daemon.poll() is None:
                out = run([args.cli, f"--socket={sock}", "--json", "config"])
                if out.returncode == 0:
                    config = json.loads(out.stdout)
                    break
                time.sleep(0.1)
            if not c.check(config is not None, f"{what}: the daemon serves with it"):
                log.seek(0)
                print(log.read()[-3000:])
                return
            c.equal(config["recall_sample_every"], int(values["recall_sample_every"]),
                    f"{what}: GetConfig recall_sample_every")
            c.equal(config["index_preset"], values["index_preset"], f"{what}: GetConfig index_preset")
            c.equal(config["log_level"], values["log_level"], f"{what}: GetConfig log_level")
            c.equal(config["shutdown_grace_seconds"], parse_duration(values["shutdown_grace"]),
                    f"{what}: GetConfig shutdown_grace_seconds")
            c.equal(int(config["memory_limit_bytes"]), 256 << 20,
                    f"{what}: GetConfig memory_limit_bytes (the override after --flagfile wins)")
            c.equal(int(config["client_quota_bytes"]), 256 << 20,
                    f"{what}: GetConfig client_quota_bytes (--client_quota=0: the whole limit)")
            c.equal(config["attach_socket_path"], attach_sock,
                    f"{what}: GetConfig attach_socket_path (empty --attach_socket: next to --socket)")
            c.check(config.get("tcp_address", "").startswith("127.0.0.1:"),
                    f"{what}: GetConfig tcp_address {config.get('tcp_address')!r}")
            status = run([args.cli, f"--socket={sock}", "status"])
            c.check(status.returncode == 0 and "SERVING" in status.stdout,
                    f"{what}: icecache status says SERVING: {status.stdout.strip()!r}")
            # Both sockets: any uid may connect (an engine of another uid needs only
            # --allow_uids, no group); the daemon decides access (SO_PEERCRED, tokens).
            for name, path in (("control", sock), ("attach", attach_sock)):
                mode = os.stat(path).st_mode
                c.check(stat.S_ISSOCK(mode), f"{what}: the {name} socket exists")
                c.check(connectable_by_anyone(mode),
                        f"{what}: {name} socket mode {oct(mode & 0o777)}: connectable by any uid "
                        "(mode & 0666 == 0666) under umask 022")
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                rc = daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                rc = daemon.wait()
            c.equal(rc, 0, f"{what}: daemon exit status after SIGTERM (exec'd by the entrypoint: "
                    "it got the signal)")
            log.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--icecached", required=True)
    parser.add_argument("--cli", required=True)
    args = parser.parse_args()
    c = Checks("deploy_daemon_flags")

    defaults = daemon_flags(help_sections(args.icecached, "--helpfull"))
    c.check(len(defaults) >= 15, f"parsed {len(defaults)} daemon flags from --helpfull")
    # --help lists the daemon's own flags (and only those); --helpfull lists every flag.
    short = help_sections(args.icecached, "--help")
    c.check("memory_limit" in daemon_flags(short),
            f"icecached --help lists --memory_limit (sections: {sorted(short)})")
    c.equal(sorted(daemon_flags(short)), sorted(defaults),
            "the daemon flags icecached --help lists vs those of --helpfull")
    c.check(all(DAEMON_SOURCES.search(source) for source in short),
            f"icecached --help lists the daemon's flags only: {sorted(short)}")
    entries = read_flagfile()
    names = [n.replace("-", "_") for n, _, _ in entries]
    c.check(len(names) == len(set(names)), f"a flag appears twice in the flagfile: {names}")
    for n, _, _ in entries:
        c.check("-" not in n, f"--{n}: icecached.flags spells flag names with underscores "
                "throughout, as --help prints them (the daemon would accept dashes too)")
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
    values = {n.replace("-", "_"): v for n, v, _ in entries}

    # The real daemon, through the image's entrypoint, with the file as it is ...
    serve_with(c, args, FLAGFILE, values, "icecached.flags")
    # ... and with its flag names spelled with dashes, which a flagfile accepts too. One value
    # is changed in the copy, so that GetConfig shows a dashed name took effect (the file's
    # values it reports are the binary's defaults).
    changed = dict(values, recall_sample_every=str(int(values["recall_sample_every"]) + 1))
    with tempfile.TemporaryDirectory(prefix="icecache-dashed-") as tmp:
        dashed = os.path.join(tmp, "icecached.flags")
        with open(dashed, "w") as f:
            for name, value, _ in entries:
                f.write(f"--{name.replace('_', '-')}={changed.get(name, value)}\n")
        with open(dashed) as f:
            text = f.read()
        c.check("--memory-limit=" in text and f"--recall-sample-every={changed['recall_sample_every']}\n" in text,
                "the copy spells the flag names with dashes")
        serve_with(c, args, dashed, changed, "dashed copy of icecached.flags")
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
