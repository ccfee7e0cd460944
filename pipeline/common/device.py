"""Where a stage's worker runs, and no silent CPU fallback.

The driver decides whether a stage asks Ray for GPUs (``runtime.device``: ``cuda`` always, ``auto`` when the
cluster has one, ``cpu`` never; ``RuntimeConfig.use_gpu``). Ray then hands a worker GPU ids, but that does not
mean the worker's libraries can use them: a driver older than the one torch's CUDA build needs, a CPU-only
torch, CuPy missing from the image. Each worker resolves its device here, once:

- the library can use a GPU: the worker runs on it;
- Ray gave the worker a GPU (or ``runtime.device=cuda`` asked for one) and the library cannot use it:
  under ``runtime.device=cuda`` the worker raises ``DeviceUnavailableError``, one line naming the stage, the
  node, what torch (or CuPy) reports and the NVIDIA driver the CUDA build needs; under ``auto`` it logs that
  line as a warning, once per worker process, and runs on CPU;
- otherwise (no GPU given, or ``runtime.device=cpu``) it runs on CPU.

Every worker reports what it used (``WorkerDevice.record``); the driver writes the distinct records of each
stage to run.json (``devices``). GPU libraries are imported lazily, only by the worker that resolves.
"""
from __future__ import annotations

import importlib
import os
import re
import warnings
from dataclasses import asdict, dataclass

from pipeline.common.log import get_logger

# The oldest Linux NVIDIA driver each CUDA major release runs on (NVIDIA's CUDA compatibility table, minor
# version compatibility): a CUDA 13 build of torch (torch 2.13.0 from PyPI) needs 580 or newer.
MIN_DRIVER = {13: "580.65.06", 12: "525.60.13", 11: "450.80.02"}
DRIVER_FILE = "/proc/driver/nvidia/version"
_MARK = "DeviceUnavailableError: "
# For rehearsing GPU scheduling on machines without GPUs (Ray's logical GPUs: ``ray.init(num_gpus=1)``, a fake
# autoscaling cluster; used by the tests): when set, runtime.device=cuda warns and runs on CPU as auto does,
# instead of failing. Read in each worker; documented in docs/pipeline.md.
LOGICAL_GPUS_ENV = "MANIFOLDGD_LOGICAL_GPUS"
_warned: set[str] = set()  # warning lines this worker process has logged already


class DeviceUnavailableError(RuntimeError):
    """A worker was given a GPU (or ``runtime.device=cuda`` asked for one) that its library cannot use."""


@dataclass(frozen=True)
class WorkerDevice:
    stage: str
    device: str           # what the work ran on: "cuda:0", "cpu"
    requested: str        # runtime.device: auto | cuda | cpu
    node: str             # the node's IP address ("local" without Ray)
    node_id: str
    pid: int
    gpu_ids: tuple = ()   # what Ray assigned to the worker
    fallback: str = ""    # why it runs on CPU although it was given a GPU (auto only); empty otherwise

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"

    def record(self) -> dict:
        out = asdict(self)
        out["gpu_ids"] = list(self.gpu_ids)
        return out


def ray_worker() -> tuple[str, str, tuple]:
    """(node IP, node id, GPU ids Ray assigned) of this process; ("local", "local", ()) without Ray."""
    try:
        ray = importlib.import_module("ray")
    except ImportError:
        return "local", "local", ()
    if not ray.is_initialized():
        return "local", "local", ()
    ctx = ray.get_runtime_context()
    return (ray.util.get_node_ip_address(), ctx.get_node_id(),
            tuple(str(g) for g in ray.get_gpu_ids()))


def nvidia_driver() -> str:
    """The node's NVIDIA kernel driver version ("" when none is loaded)."""
    try:
        with open(DRIVER_FILE) as f:
            text = f.read()
    except OSError:
        return ""
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return m.group(1) if m else ""


def driver_requirement(cuda_build: str | None) -> str:
    """What the build needs, and what the node has, in words."""
    found = nvidia_driver()
    have = f"this node has {found}" if found else f"this node has no NVIDIA driver loaded ({DRIVER_FILE} missing)"
    if not cuda_build:
        return f"this torch is a CPU-only build: install a CUDA build (requirements/lock-gpu.txt); {have}"
    major = int(str(cuda_build).split(".")[0])
    need = MIN_DRIVER.get(major)
    need_text = f"an NVIDIA driver >= {need}" if need else f"an NVIDIA driver for CUDA {cuda_build}"
    return f"its CUDA {cuda_build} build needs {need_text}; {have}"


def torch_cuda_problem() -> str:
    """Empty when torch can use a CUDA device; otherwise what torch reports and what it needs (one line)."""
    torch = importlib.import_module("torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    if available and count > 0:
        return ""
    said = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    report = f"torch {torch.__version__} reports torch.cuda.is_available() = False"
    if said:
        report += f" ({said[0]})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        report += f", CUDA_VISIBLE_DEVICES={visible!r}"
    return f"{report}; {driver_requirement(torch.version.cuda)}"


def cupy_gpu_problem() -> str:
    """Empty when CuPy can use a CUDA device; otherwise what CuPy says, with torch's view of the GPU (one line)."""
    backend = importlib.import_module("ops.backend")
    problem = backend.cupy_problem()
    if not problem:
        return ""
    try:
        torch_view = torch_cuda_problem() or "torch can use it"
    except ImportError:
        torch_view = "torch is not installed"
    return f"{problem}; {torch_view}"


def _fallback_line(stage: str, library: str, node: str, gpu_ids: tuple, problem: str) -> str:
    given = f"Ray gave this worker GPU(s) {', '.join(gpu_ids)}" if gpu_ids else "runtime.device=cuda asked for a GPU"
    return f"{stage}: {given} on node {node}, but {library} cannot use it: {problem}"


def _check(stage: str, requested: str, library: str, problem: str, node: str, gpu_ids: tuple) -> str:
    """Raise (cuda) or warn once (auto) about a GPU the library cannot use; returns the line ("" if none)."""
    if not problem:
        return ""
    line = _fallback_line(stage, library, node, gpu_ids, problem)
    if requested == "cuda" and not os.environ.get(LOGICAL_GPUS_ENV):
        raise DeviceUnavailableError(f"{line}. Fix the node's driver or image, or run on CPU with "
                                     "--set runtime.device=cpu")
    warn_once(f"warning: {line}; running on CPU (runtime.device={requested}; set runtime.device=cuda to fail "
              "instead)" if requested == "auto" else f"warning: {line}; running on CPU ({LOGICAL_GPUS_ENV} is set)")
    return line


def torch_device(stage: str, requested: str) -> WorkerDevice:
    """The device a torch worker (VAE encode, sampling) runs on; ``requested`` is ``runtime.device``, or
    ``cpu`` where the driver asked Ray for no GPU. See the module docstring."""
    node, node_id, gpu_ids = ray_worker()
    base = {"stage": stage, "requested": requested, "node": node, "node_id": node_id, "pid": os.getpid(),
            "gpu_ids": gpu_ids}
    if requested == "cpu":
        return WorkerDevice(device="cpu", **base)
    problem = torch_cuda_problem()
    given = bool(gpu_ids) or requested == "cuda"
    if not given:  # auto, no GPU from Ray: a GPU torch sees anyway (in-process use) is still used
        return WorkerDevice(device="cpu" if problem else _torch_index(), **base)
    line = _check(stage, requested, "torch", problem, node, gpu_ids)
    return WorkerDevice(device="cpu" if line else _torch_index(), fallback=line, **base)


def _torch_index() -> str:
    torch = importlib.import_module("torch")
    return f"cuda:{torch.cuda.current_device()}"


def cupy_device(stage: str, requested: str, backend: str) -> WorkerDevice:
    """The device a stage-2 task runs on with ``cluster.backend`` = ``backend``. Only ``auto`` falls back, and
    only where Ray gave the task a GPU share: ``cupy`` and ``cuml`` refuse to run without a GPU
    (``ops.backend.resolve_backend``), ``numpy`` is a choice, and ``runtime.gpus_per_plan_task=0`` plans on
    CPUs by design."""
    node, node_id, gpu_ids = ray_worker()
    line = ""
    if backend == "auto" and gpu_ids and requested != "cpu":
        line = _check(stage, requested, "CuPy", cupy_gpu_problem(), node, gpu_ids)
    resolved = importlib.import_module("ops.backend").resolve_backend(backend)
    device = "cpu"
    if resolved.on_gpu:
        device = f"cuda:{resolved.xp.cuda.runtime.getDevice()}"
    return WorkerDevice(stage=stage, device=device, requested=requested, node=node, node_id=node_id,
                        pid=os.getpid(), gpu_ids=gpu_ids, fallback=line)


def warn_once(line: str) -> None:
    """Log ``line`` the first time this worker process sees it."""
    if line not in _warned:
        _warned.add(line)
        get_logger().warning(line)


def device_error_line(exc: BaseException) -> str:
    """The one-line message of a DeviceUnavailableError raised in a worker, wherever Ray wrapped it
    (a task's error, an actor that died in its constructor, a Ray Data failure); "" if there is none."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is DeviceUnavailableError:
            return str(e).strip().splitlines()[0]
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    text = str(exc)
    at = text.rfind(_MARK)
    return text[at + len(_MARK):].splitlines()[0].strip() if at >= 0 else ""


def summarize(records) -> list[dict]:
    """Distinct worker records of one stage, in a stable order (a plan task per class on one worker is one
    record)."""
    keyed = {}
    for r in records:
        if r:
            keyed[(r["node"], r["node_id"], r["pid"], r["device"])] = r
    return [keyed[k] for k in sorted(keyed)]
