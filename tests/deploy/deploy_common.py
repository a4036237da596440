"""Helpers shared by the deployment checks (tests/deploy/*.py): paths, the daemon's flagfile,
quantities in the daemon's and Kubernetes' spellings, subprocesses and a small check
collector that reports every failed assertion before exiting non-zero."""
import os
import re
import socket
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy")
FLAGFILE = os.path.join(DEPLOY, "kubernetes", "common", "icecached.flags")
RULES = os.path.join(DEPLOY, "prometheus", "icecache.rules.yaml")
RULE_TESTS = os.path.join(DEPLOY, "prometheus", "tests", "icecache.rules.test.yaml")
SCRAPE_EXAMPLE = os.path.join(DEPLOY, "prometheus", "prometheus.example.yaml")
DASHBOARD = os.path.join(DEPLOY, "grafana", "icecache-dashboard.json")
DEPLOY_README = os.path.join(DEPLOY, "README.md")


class Checks:
    """Collects failed assertions; `done()` prints them and returns the exit status."""

    def __init__(self, name):
        self.name = name
        self.failures = []
        self.passed = 0

    def check(self, condition, message):
        if condition:
            self.passed += 1
        else:
            self.failures.append(message)
            print(f"FAIL: {message}", flush=True)
        return condition

    def equal(self, got, want, message):
        return self.check(got == want, f"{message}: got {got!r}, want {want!r}")

    def done(self):
        if self.failures:
            print(f"{self.name}: {len(self.failures)} failed, {self.passed} passed")
            return 1
        print(f"{self.name}: all {self.passed} checks passed")
        return 0


_BYTE_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
               "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               # Kubernetes quantities
               "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
               "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_bytes(text):
    """'64GiB', '72Gi', '512MiB', '0', '1000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2) not in _BYTE_UNITS:
        raise ValueError(f"not a byte size: {text!r}")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2)])


def parse_cpu(text):
    """Kubernetes CPU quantity -> cores ('8', '500m')."""
    text = str(text)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text):
    """Abseil duration ('10s', '50us', '1m30s') -> seconds."""
    total, pos = 0.0, 0
    text = text.strip()
    for m in re.finditer(r"([0-9.]+)(ns|us|ms|s|m|h)", text):
        if m.start() != pos:
            raise ValueError(f"not a duration: {text!r}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a duration: {text!r}")
    return total


def read_flagfile(path=FLAGFILE):
    """The flags of a flagfile in order: [(name, value, comment_lines_before_it)]."""
    flags, comments = [], []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            stripped = line.strip()
            if not stripped:
                comments = []
                continue
            if stripped.startswith("#"):
                comments.append(stripped)
                continue
            m = re.fullmatch(r"--([A-Za-z0-9_-]+)=(.*)", stripped)
            if not m:
                raise ValueError(f"{path}: not a --flag=value line: {line!r}")
            flags.append((m.group(1), m.group(2), comments))
            comments = []
    return flags


def effective_flags(args, flagfile_flags):
    """Flag values a container ends up with: the flagfile's, then its later args (later wins,
    as Abseil parses them)."""
    values = {}
    for a in args:
        if a.startswith("--flagfile="):
            for name, value, _ in flagfile_flags:
                values[name.replace("-", "_")] = value
        else:
            m = re.fullmatch(r"--([A-Za-z0-9_-]+)=(.*)", a)
            if m:
                values[m.group(1).replace("-", "_")] = m.group(2)
    return values


def free_port():
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kwargs):
    """Runs a command, returns CompletedProcess with text output (never raises on status)."""
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def die(message):
    print(f"FATAL: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
