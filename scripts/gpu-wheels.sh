#!/usr/bin/env bash
# Wheels of every dependency lesion-vq needs beyond torch, torchvision and accelerate, for a bare GPU machine that
# has those three and no package index (docs/gpu.md). Run it where PyPI is reachable:
#
#     scripts/gpu-wheels.sh DIR [--python-version 3.12] [--check]
#
# DIR gets the wheels (manylinux x86-64, CPython of --python-version) and DIR/requirements.txt pinning each one.
# On the GPU machine, from the repository root:
#
#     pip install --no-index --find-links DIR --no-deps -r DIR/requirements.txt
#
# What is left out: torch, torchvision, accelerate and whatever only they need (the CUDA libraries, triton, sympy,
# ...): the GPU machine has those, and --no-deps keeps pip from touching them. The rest is what pyproject.toml's
# dependencies need (transitively, evaluated for that Python on Linux x86-64) plus nvidia-ml-py, which
# `python -m bench gpu` reads GPU busy % with. A dependency published only as a source archive is built into a
# wheel here with `pip wheel` (a pure-Python one then fits any Python; the script says when one is not).
#
# --check (only with --python-version of the Python running this script): installs DIR into a new empty venv
# exactly as above, with pip's configuration and index ignored, then runs `pip check`, which may only miss
# torch, torchvision and accelerate (or what only they need).
set -euo pipefail

usage() { echo "usage: $0 DIR [--python-version X.Y] [--check]" >&2; exit 2; }
dir="" version="3.12" check=0
while [ $# -gt 0 ]; do
    case "$1" in
        --python-version) [ $# -ge 2 ] || usage; version="$2"; shift 2 ;;
        --check) check=1; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; usage ;;
        *) [ -z "$dir" ] || usage; dir="$1"; shift ;;
    esac
done
[ -n "$dir" ] || usage
[[ "$version" =~ ^3\.[0-9]+$ ]] || { echo "error: --python-version must look like 3.12, got '$version'" >&2; exit 2; }
python="${PYTHON:-python3}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

target=(--only-binary=:all: --python-version "$version" --implementation cp
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
leave_out="torch torchvision accelerate"

# The project's dependencies, without the three the GPU machine has, and nvidia-ml-py.
"$python" - "$repo/pyproject.toml" "$leave_out" > "$work/roots.txt" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
leave = set(sys.argv[2].split())
for dep in deps + ["nvidia-ml-py"]:
    if re.split(r"[\s\[<>=!~;]", dep, maxsplit=1)[0].lower() not in leave:
        print(dep)
EOF

# Resolve for the target (metadata only); a requirement with no wheel is built into one and the resolution redone.
for attempt in 1 2 3 4 5 6 7 8 9 10; do
    if "$python" -m pip install --dry-run --ignore-installed --quiet --report "$work/report.json" --target "$work/t" \
            --find-links "$dir" "${target[@]}" -r "$work/roots.txt" 2> "$work/resolve.err"; then
        break
    fi
    missing="$(sed -n 's/.*No matching distribution found for \(.*\)$/\1/p' "$work/resolve.err" | head -1)"
    if [ -z "$missing" ] || [ "$attempt" = 10 ]; then
        echo "error: resolving the dependencies failed:" >&2; tail -20 "$work/resolve.err" >&2; exit 1
    fi
    echo "no wheel of '$missing' for Python $version: building one from its source archive"
    "$python" -m pip wheel --quiet --no-deps --no-binary=:all: -w "$dir" "$missing"
done

# What the roots need without passing through the three left out (markers evaluated for the target).
"$python" - "$work/report.json" "$work/roots.txt" "$version" "$leave_out" > "$dir/requirements.txt" <<'EOF'
import json, sys
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

report, roots, version, leave = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split()
env = default_environment() | {"python_version": version, "python_full_version": f"{version}.0",
                               "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                               "os_name": "posix", "implementation_name": "cpython",
                               "platform_python_implementation": "CPython"}
resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in json.load(open(report))["install"]}
left_out = {canonicalize_name(n) for n in leave}

def applies(req, extras):
    return req.marker is None or any(req.marker.evaluate(env | {"extra": e}) for e in (extras or {""}))

extras_of, todo = {}, [Requirement(line) for line in open(roots) if line.strip()]
while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    if name in left_out:
        continue
    known = extras_of.get(name)
    wanted = set(req.extras) | (known or set())
    if known is not None and wanted == known:
        continue
    extras_of[name] = wanted
    todo += [r for r in map(Requirement, resolved[name].get("requires_dist", [])) if applies(r, wanted)]
for name in sorted(extras_of):
    print(f"{resolved[name]['name']}=={resolved[name]['version']}")
EOF

"$python" -m pip download --quiet --no-deps --find-links "$dir" "${target[@]}" -d "$dir" -r "$dir/requirements.txt"
for wheel in "$dir"/*.whl; do  # a wheel built here from source fits only this machine's Python and glibc
    name="$(basename "$wheel")"
    if [[ "$name" == *-linux_x86_64.whl ]] || { [[ "$name" =~ -cp3[0-9]+- ]] && [[ "$name" != *-cp${version/./}-* ]] \
            && [[ "$name" != *-abi3-* ]]; }; then
        echo "warning: $name may not install on CPython $version, manylinux x86-64 (built here from source?)" >&2
    fi
done
count="$(wc -l < "$dir/requirements.txt")"
echo "$count wheels for CPython $version, manylinux x86-64, in $dir ($(du -sh "$dir" | cut -f1)); pins in $dir/requirements.txt"

if [ "$check" = 1 ]; then
    here="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    [ "$here" = "$version" ] || { echo "error: --check needs --python-version $here (this Python)" >&2; exit 2; }
    "$python" -m venv "$work/venv"
    # Nothing but DIR: no index, no configured find-links, mirrors or constraints.
    for var in $(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/\1/p'); do unset "$var"; done
    export PIP_CONFIG_FILE=/dev/null
    "$work/venv/bin/python" -m pip install --quiet --no-index --find-links "$dir" --no-deps -r "$dir/requirements.txt"
    echo "check: installed $count wheels into an empty venv from $dir alone (rc 0)"
    "$work/venv/bin/python" -m pip check > "$work/check.txt" || true
    "$python" - "$work/check.txt" "$dir/requirements.txt" "$leave_out" <<'EOF'
import re, sys
lines = [l for l in open(sys.argv[1]).read().splitlines() if l.strip() and l != "No broken requirements found."]
leave = set(sys.argv[3].split())
missing = {m.group(1).lower() for l in lines if (m := re.search(r"requires ([A-Za-z0-9_.\-]+)", l))}
others = missing - leave
print(f"check: pip check misses {sorted(missing) or 'nothing'}")
if others or any("requires" not in l for l in lines):
    sys.exit(f"check failed: besides {sorted(leave)}: {sorted(others)} {lines}")
EOF
    "$work/venv/bin/python" -c "import matplotlib, numpy, PIL, pydantic, pynvml, safetensors, submitit, tqdm, wandb, webdataset"
    echo "check: the wheels' modules that do not need torch import"
fi
