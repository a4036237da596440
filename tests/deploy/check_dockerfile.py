#!/usr/bin/env python3
"""deploy_dockerfile: the Dockerfile parses and its stages fit the repository.

scripts/image.sh builds the image for real and runs it (ctest label "image"), with the CUDA
toolkit from PyPI; this checks what such a run cannot see, above all the default path through
NVIDIA's devel image, which no registry here serves. It parses the Dockerfile the way the
builder does (line continuations, comments, parser directives, ARG substitution in FROM) and
checks:
- known instructions only; global ARGs before the first FROM; every stage named and unique;
- the toolkit: a cuda-nvidia stage from NVIDIA's devel image, a cuda-pypi stage on Debian 12
  that runs deploy/docker/install-cuda-toolkit.sh with CUDA_VERSION and the wheel directory
  scripts/image.sh mounts, and a cuda stage that CUDA_SOURCE (default nvidia) points at one of
  them for each value the header documents;
- the builder stage takes /usr/local/cuda from the cuda stage and runs the README's and CI's
  commands, scripts/bootstrap.sh and scripts/build.sh;
- COPY --from names an earlier stage; every COPY source exists in the repository and is not
  excluded by .dockerignore; files the build stage installs from the build tree are the paths
  CMake gives the binaries (checked against this build directory);
- the runtime stage: a slim, non-CUDA base, no compiler, no -dev package, no toolkit copied
  in, a non-root USER, an exec-form ENTRYPOINT that exists and parses (sh -n), the metrics
  port exposed; and its apt packages are exactly the Debian packages that provide the shared
  libraries the built binaries load (ldd + dpkg -S), libc6 aside;
- every build argument is documented in the header.
"""
import argparse
import fnmatch
import os
import re
import shlex
import sys

from deploy_common import Checks, ROOT, run

DOCKERFILE = os.path.join(ROOT, "Dockerfile")
IMAGE_SH = os.path.join(ROOT, "scripts", "image.sh")
TOOLKIT_SH = os.path.join(ROOT, "deploy", "docker", "install-cuda-toolkit.sh")
DOCKERIGNORE = os.path.join(ROOT, ".dockerignore")
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
COMPILER = re.compile(r"^(gcc|g\+\+|clang|cpp|cc|c\+\+|build-essential|cmake|ninja-build|make|"
                      r"nvidia-cuda-toolkit|cuda-.*|libcuda.*-dev|.*-dev)(-[0-9.]+)?$")


def parse(path):
    """[(instruction, args_text, line_number)] with continuations joined and comments dropped."""
    lines = open(path).read().split("\n")
    escape = "\\"
    out, buf, start = [], "", None
    for i, raw in enumerate(lines, 1):
        m = re.match(r"#\s*escape\s*=\s*(\S)", raw)
        if m and not out and not buf:
            escape = m.group(1)
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if start is None:
            start = i
        if stripped.endswith(escape):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip(), start))
        buf, start = "", None
    if buf:
        raise SystemExit(f"{path}: the last instruction ends in a line continuation")
    return out


def substitute(text, args):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def dockerignore_patterns():
    pats = []
    for line in open(DOCKERIGNORE):
        line = line.strip()
        if line and not line.startswith("#"):
            pats.append(line.lstrip("/"))
    return pats


def ignored(rel, patterns):
    parts = rel.split("/")
    for pat in patterns:
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:])):
                return True
    return False


def copy_parts(args_text):
    """(flags, sources, dest) of a COPY/ADD, shell or JSON form."""
    if args_text.startswith("["):
        import json
        items = json.loads(args_text)
        flags = []
    else:
        items = shlex.split(args_text)
        flags = [a for a in items if a.startswith("--")]
        items = [a for a in items if not a.startswith("--")]
    return flags, items[:-1], items[-1]


def packages_of(binaries):
    """Debian packages providing the shared libraries the binaries load (ldd; one dpkg -S)."""
    libs = set()
    for binary in binaries:
        out = run(["ldd", binary])
        for line in out.stdout.splitlines():
            m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)", line)
            if m:
                libs.add(m.group(1))
    candidates = {}
    for path in libs:
        forms = {path, os.path.realpath(path)}
        for f in list(forms):
            forms.add(re.sub(r"^/usr/", "/", f))  # merged /usr: dpkg knows one spelling
            if not f.startswith("/usr/"):
                forms.add("/usr" + f)
        candidates[path] = forms
    owner = {}
    out = run(["dpkg", "-S"] + sorted(set().union(*candidates.values())))
    for line in out.stdout.splitlines():
        pkg, _, path = line.partition(": ")
        owner[path.strip()] = pkg.split(":")[0].strip()
    pkgs = set()
    for path, forms in candidates.items():
        found = [owner[f] for f in forms if f in owner]
        if not found:
            raise SystemExit(f"no Debian package provides {path}")
        pkgs.add(found[0])
    return pkgs


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--build-dir", required=True, help="a build of this repository")
    parser.add_argument("--binary", action="append", default=[], help="a binary the image ships")
    args = parser.parse_args()
    c = Checks("deploy_dockerfile")
    instructions = parse(DOCKERFILE)
    header = open(DOCKERFILE).read().split("\nFROM ")[0]

    global_args, stages = {}, []
    for word, text, line in instructions:
        c.check(word in INSTRUCTIONS, f"line {line}: unknown instruction {word}")
        if word == "ARG" and not stages:
            name, _, default = text.partition("=")
            global_args[name] = default.strip('"')
        elif word == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", text, re.I)
            if not c.check(m is not None, f"line {line}: FROM {text}"):
                continue
            image = substitute(m.group(1), global_args)
            c.check("$" not in image, f"line {line}: FROM {m.group(1)} resolves ({image})")
            stages.append({"name": m.group(2), "image": image, "line": line, "body": []})
        else:
            c.check(bool(stages) or word == "ARG", f"line {line}: {word} before the first FROM")
            if stages:
                stages[-1]["body"].append((word, text, line))
    names = [s["name"] for s in stages]
    c.check(all(names), f"every stage is named: {names}")
    c.check(len(set(names)) == len(names), f"stage names unique: {names}")
    c.check(len(stages) >= 3, f"multi-stage: {len(stages)} stages")
    for name in global_args:
        c.check(re.search(rf"^#\s+{name}\b", header, re.M) is not None, f"build argument {name} documented")

    # The toolkit stages: NVIDIA's devel image, or NVIDIA's PyPI wheels; CUDA_SOURCE picks one.
    by_name = {s["name"]: s for s in stages}
    nvidia = by_name.get("cuda-nvidia")
    c.check(nvidia is not None and re.fullmatch(r"nvidia/cuda:[0-9.]+-devel-\S+", nvidia["image"]),
            f"cuda-nvidia stage from an NVIDIA CUDA devel image: {nvidia and nvidia['image']}")
    c.equal(global_args.get("CUDA_SOURCE"), "nvidia", "CUDA_SOURCE defaults to NVIDIA's image")
    sources = re.search(r"^#\s+CUDA_SOURCE\b(.*?)^#\s+CUDA_VERSION\b", header, re.M | re.S)
    # A value line: the value, "(default)" maybe, two or more spaces, its description.
    documented = re.findall(r"^#\s+(\w+)(?: \(default\))? {2,}\S", sources.group(1), re.M) if sources else []
    c.equal(sorted(documented), ["nvidia", "pypi"], "CUDA_SOURCE values documented in the header")
    selector = by_name.get("cuda")
    if c.check(selector is not None and not selector["body"], "a cuda stage that only selects"):
        raw = next(t for w, t, l in instructions if w == "FROM" and l == selector["line"])
        c.check(raw.split()[0] == "cuda-${CUDA_SOURCE}", f"the cuda stage is FROM cuda-${{CUDA_SOURCE}}: {raw}")
        before = [s["name"] for s in stages[:stages.index(selector)]]
        for value in documented:
            c.check(f"cuda-{value}" in before, f"CUDA_SOURCE={value} names an earlier stage cuda-{value}")
    pypi = by_name.get("cuda-pypi")
    if c.check(pypi is not None, "a cuda-pypi stage"):
        c.check(re.fullmatch(r"debian:12(\.[0-9]+)?", pypi["image"]) is not None,
                f"cuda-pypi starts from Debian 12: {pypi['image']}")
        body = pypi["body"]
        c.check(("ARG", "CUDA_VERSION") in [(w, t) for w, t, _ in body], "cuda-pypi takes ARG CUDA_VERSION")
        copies = [copy_parts(t) for w, t, _ in body if w == "COPY"]
        script = [dest for _, srcs, dest in copies if srcs == ["deploy/docker/install-cuda-toolkit.sh"]]
        c.check(len(script) == 1, "cuda-pypi copies deploy/docker/install-cuda-toolkit.sh")
        runs = [t for w, t, _ in body if w == "RUN"]
        call = [m for t in runs for m in re.finditer(r"(\S+) \"\$\{CUDA_VERSION\}\" (\S+)", t)]
        if c.check(len(call) == 1 and script and os.path.basename(script[0]) == call[0].group(1),
                   "cuda-pypi runs the copied script with \"${CUDA_VERSION}\" and a wheel directory"):
            wheel_dir = call[0].group(2)
            mounts = re.findall(r'-v "\$wheels:([^:"]+):ro"', open(IMAGE_SH).read())
            c.equal(mounts, [wheel_dir], "scripts/image.sh mounts its wheels where cuda-pypi looks")
        requirement = re.compile(r'"(cuda-toolkit\[[a-z,]+\]==)\$\w+"')
        c.equal(requirement.findall(open(IMAGE_SH).read()), requirement.findall(open(TOOLKIT_SH).read()),
                "scripts/image.sh downloads the wheels install-cuda-toolkit.sh installs")
        c.check(os.access(TOOLKIT_SH, os.X_OK) and run(["sh", "-n", TOOLKIT_SH]).returncode == 0,
                "install-cuda-toolkit.sh is executable and parses (sh -n)")
    toolkit_stages = {"cuda", "cuda-nvidia", "cuda-pypi"}

    # Builder: the toolkit of the cuda stage, the README's and CI's commands.
    build = next((s for s in stages if s["name"] == "build"), None)
    runtime = stages[-1]
    if c.check(build is not None, "a stage named build"):
        runs = " ".join(t for w, t, _ in build["body"] if w == "RUN")
        c.check(re.search(r"(^|\s|&&\s*)\./scripts/bootstrap\.sh\b", runs) is not None,
                "build runs ./scripts/bootstrap.sh")
        c.check(re.search(r"\./scripts/build\.sh\b", runs) is not None, "build runs ./scripts/build.sh")
        c.check(any(copy_parts(t) == (["--from=cuda"], ["/usr/local/cuda"], "/usr/local/cuda")
                    for w, t, _ in build["body"] if w == "COPY"),
                "build copies /usr/local/cuda from the cuda stage")
        arch = [t for w, t, _ in build["body"] if w == "ARG" and t.startswith("CUDA_ARCHITECTURES")]
        c.check(arch and re.search(r"ICECACHE_CUDA_ARCHITECTURES=\"?\$\{CUDA_ARCHITECTURES\}", runs),
                "CUDA_ARCHITECTURES reaches CMake")
        c.check(re.search(rf"^#\s+CUDA_ARCHITECTURES\b", header, re.M) is not None,
                "build argument CUDA_ARCHITECTURES documented")
        # What the build stage installs from the build tree exists in a real build.
        for rel in re.findall(r"\bbuild/(\S+?)\s", runs + " "):
            if rel.startswith("CMake"):
                continue
            c.check(os.path.isfile(os.path.join(args.build_dir, rel)),
                    f"build installs build/{rel}: {os.path.join(args.build_dir, rel)} exists")
        for rel in re.findall(r"install -D -m \d+ (\S+) ", runs):
            if not rel.startswith("build/"):
                c.check(os.path.isfile(os.path.join(ROOT, rel)), f"build installs {rel}: exists in the repository")

    # COPY sources and --from targets.
    patterns = dockerignore_patterns()
    for i, s in enumerate(stages):
        earlier = {st["name"] for st in stages[:i]} | {str(k) for k in range(i)}
        for word, text, line in s["body"]:
            if word not in ("COPY", "ADD"):
                continue
            flags, sources, _ = copy_parts(text)
            frm = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
            if frm:
                c.check(frm[0] in earlier, f"line {line}: COPY --from={frm[0]} names an earlier stage")
                continue
            for src in sources:
                rel = os.path.normpath(src)
                c.check(rel == "." or os.path.exists(os.path.join(ROOT, rel)),
                        f"line {line}: COPY source {src} exists in the repository")
                c.check(rel == "." or not ignored(rel, patterns),
                        f"line {line}: COPY source {src} is not excluded by .dockerignore")
    for must in ("build", "build-deploy", ".gpu-pack"):
        c.check(ignored(must, patterns), f".dockerignore excludes {must}")
    c.check(not ignored("scripts/bootstrap.sh", patterns) and not ignored(".git", patterns),
            ".dockerignore keeps the scripts and .git (the version string)")

    # Runtime stage.
    c.check(re.fullmatch(r"debian:12(\.[0-9]+)?-slim", runtime["image"]) is not None,
            f"runtime base is debian:12-slim (the build's OS, slim): {runtime['image']}")
    body = runtime["body"]
    installed = set()
    for word, text, line in body:
        if word == "RUN":
            for m in re.finditer(r"apt-get install ([^&;|]*)", text):
                installed |= {w for w in m.group(1).split() if not w.startswith("-")}
            c.check(not re.search(r"\b(gcc|g\+\+|clang|nvcc|cmake|make|pip)\b", text.replace("apt-get", "")),
                    f"line {line}: the runtime stage runs no compiler or build tool")
        if word == "COPY":
            flags, sources, _ = copy_parts(text)
            frm = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
            c.check(not frm or frm[0] not in toolkit_stages,
                    f"line {line}: the runtime stage copies nothing from the CUDA toolkit")
    for p in sorted(installed):
        c.check(not COMPILER.match(p), f"runtime installs {p}: a compiler or -dev package")
    users = [t for w, t, _ in body if w == "USER"]
    c.check(users and users[-1].split(":")[0] not in ("0", "root"), f"runtime USER is not root: {users}")
    last_run = max([l for w, _, l in body if w == "RUN"], default=0)
    c.check(users and max(l for w, _, l in body if w == "USER") > last_run, "USER comes after the last RUN")
    entry = [t for w, t, _ in body if w == "ENTRYPOINT"]
    c.check(len(entry) == 1 and entry[0].startswith("["), f"one exec-form ENTRYPOINT: {entry}")
    exposed = " ".join(t for w, t, _ in body if w == "EXPOSE").split()
    c.check("9464" in exposed, f"the metrics port is exposed: {exposed}")
    script = os.path.join(ROOT, "deploy", "docker", "icecached-entrypoint.sh")
    c.check(os.access(script, os.X_OK), "the entrypoint script is executable")
    c.check(run(["sh", "-n", script]).returncode == 0, "the entrypoint script parses (sh -n)")

    needed = packages_of(args.binary) if args.binary else set()
    needed.discard("libc6")
    if args.binary:
        c.equal(sorted(installed), sorted(needed),
                "runtime packages = the packages of the libraries the binaries load (ldd)")
    described = ", ".join("%s (%s)" % (s["name"], s["image"]) for s in stages)
    print(f"{len(stages)} stages: {described}")
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
