#!/usr/bin/env bash
# The one way this project is installed: the Makefile (.venv), the Dockerfile (the cluster image) and the CI
# wheel test all run this script.
#
#   scripts/install.sh [--gpu] [--editable] [--no-lock | --deps-only] [--check] [--python PY] [TARGET]
#
# 1. the locked dependency set: requirements/lock-cpu.txt (with the dev tools), or with --gpu
#    requirements/lock-gpu.txt (the runtime lock, no test tools, plus the CUDA wheels); skipped with --no-lock,
#    for an environment that already has the dependencies;
# 2. the project itself with --no-deps, so nothing outside the lock is resolved: TARGET is the source tree
#    (default: this repository; with --editable an editable install) or a built wheel (.whl); skipped with
#    --deps-only (the Dockerfile installs the dependencies in a layer of their own, before the code is there);
# 3. `pip check`: a failure stops the script with --check, and is a warning otherwise (a base image may
#    carry packages of its own that the lock does not know).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
lock="$here/requirements/lock-cpu.txt"
editable=() use_lock=1 use_project=1 check=0 target="$here"

while [ $# -gt 0 ]; do
    case "$1" in
        --gpu) lock="$here/requirements/lock-gpu.txt" ;;
        --editable) editable=(-e) ;;
        --no-lock) use_lock=0 ;;
        --deps-only) use_project=0 ;;
        --check) check=1 ;;
        --python) py="$2"; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) echo "install.sh: unknown option $1" >&2; exit 2 ;;
        *) target="$1" ;;
    esac
    shift
done

pip=("$py" -m pip)
if [ "$use_lock" = 1 ]; then
    echo "install.sh: dependencies from ${lock#"$here"/}"
    "${pip[@]}" install -q -r "$lock"
fi
if [ "$use_project" = 1 ]; then
    echo "install.sh: manifoldgd from $target${editable:+ (editable)}"
    "${pip[@]}" install -q --no-deps "${editable[@]}" "$target"
fi
if ! "${pip[@]}" check; then
    if [ "$check" = 1 ]; then
        echo "install.sh: pip check failed" >&2
        exit 1
    fi
    echo "install.sh: warning: pip check reports the conflicts above (not from the lock's own pins)" >&2
fi
