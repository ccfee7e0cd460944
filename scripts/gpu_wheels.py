"""Download the wheels the GPU machine lacks for bench/gpu.py: diffusers and everything it needs at run time,
at the exact versions of the lock, for the GPU machine's Python (3.12, manylinux x86_64), into an ignored
folder that a device call can carry (at most 64 MiB in all).

    make gpu-wheels                                   # .gpu-wheels/cp312 (the GPU machine's Python)
    .venv/bin/python scripts/gpu_wheels.py --python-version 3.11    # .gpu-wheels/cp311: rehearse here

Which packages: the run-time dependency closure of ``diffusers`` as this environment's metadata declares it
(markers evaluated for the target Python), minus numpy (the GPU machine's torch comes with its own), each
pinned to its version in requirements/lock-cpu.txt. Compiled ones (Pillow, PyYAML, regex, safetensors,
hf-xet, charset-normalizer) come as wheels for the target Python; the rest are pure Python. docs/gpu.md has
the command that unpacks them on the GPU machine and runs the check.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock-cpu.txt"
LIMIT_MIB = 64
ROOTS = ("diffusers", "PyYAML", "pillow")  # diffusers; PyYAML and Pillow for pipeline.config and the images
SKIP = {"numpy"}  # the GPU machine's own, built for its torch


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split(";", 1)[0].split("==", 1)
            pins[canonical(name.split("[", 1)[0])] = version.strip()
    return pins


def closure(roots, python_version: str) -> list[str]:
    """Canonical names of ``roots`` and their run-time requirements (no extras), transitively."""
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "extra": "",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    seen, stack = set(), list(roots)
    while stack:
        name = canonical(stack.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in this environment (run `make install` first)") from None
        for text in requires:
            req = Requirement(text)
            if req.marker is None or Marker(str(req.marker)).evaluate(env):
                stack.append(req.name)
    return sorted(seen)


def download(names: list[str], pins: dict[str, str], dest: Path, python_version: str) -> None:
    missing = [n for n in names if n not in pins]
    if missing:
        raise SystemExit(f"not pinned in {LOCK.relative_to(ROOT)}: {', '.join(missing)}")
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp",
           "--abi", abi, "--abi", "abi3", "--abi", "none",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64", "--platform", "any",
           "--dest", str(dest)] + [f"{n}=={pins[n]}" for n in names]
    print(f"pip download: {len(names)} wheels for CPython {python_version} into {dest.relative_to(ROOT)}", flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python-version", default="3.12", help="the Python the wheels are for (3.12: the GPU machine)")
    ap.add_argument("--dest", default="", help="folder (default .gpu-wheels/cpXY, ignored by git)")
    ap.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    args = ap.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        ap.error(f"--python-version must look like 3.12, got {args.python_version!r}")
    dest = Path(args.dest) if args.dest else ROOT / ".gpu-wheels" / ("cp" + args.python_version.replace(".", ""))
    dest = dest.resolve()
    pins = lock_pins()
    names = [n for n in closure(ROOTS, args.python_version) if n not in SKIP]
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    download(names, pins, dest, args.python_version)
    wheels = sorted(dest.glob("*.whl"))
    got = {canonical(w.name.split("-", 1)[0]) for w in wheels}
    if got != set(names):
        raise SystemExit(f"wheels missing for {sorted(set(names) - got)}; unexpected {sorted(got - set(names))}")
    total = sum(w.stat().st_size for w in wheels)
    lines = [f"{hashlib.sha256(w.read_bytes()).hexdigest()}  {w.stat().st_size:>9}  {w.name}" for w in wheels]
    (dest / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in all (limit {args.limit_mib:g} MiB): {dest}")
    if total >= args.limit_mib * 2**20:
        print(f"too large to carry: {total / 2**20:.1f} MiB >= {args.limit_mib:g} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
