"""One typed config object for every knob, validated once at the door and hashed into every output.

Sources, later ones winning: dataclass defaults (the published setting, docs/method.md section 7) < ``--config FILE.yaml``
< command-line flags < ``--set section.key=value``. ``validate`` raises ``ConfigError`` naming the field;
the CLI turns that into exit code 2 before Ray starts.

The ``runtime`` section (actor counts, Ray Data batch sizes, progress) cannot change a single output byte, so
it is left out of the hash: a rerun on a bigger cluster resumes the same output folder. What does change
bytes is hashed, batch shapes included (``model.encode_batch``, ``sampler.max_batch``). A field added after
output folders existed, whose default gives the bytes they were made with, is left out of the hash while
it holds that default (``HASH_SKIPPED_DEFAULTS``): those folders still resume, and any other value is hashed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

from ops.backend import BACKENDS
from ops.guidance import GUIDANCE_MODES, SIGMA_MODES
from ops.pca import ROUTES
from ops.selection import CENTROIDS, METHODS
from ops.tangent import SCHEDULES
from pipeline.common.errors import ConfigError
from pipeline.inputs.datasets import builtin_names as builtin_dataset_names
from pipeline.models.loading import DEFAULT_MODEL, DEFAULT_VAE, looks_like_path
from pipeline.models.refs import model_fingerprint

__all__ = ["ConfigError"]  # re-exported: callers catch it from here

# The allowed values of every enumerated field, in one place: ``validate``, the sampler's own settings
# (pipeline/models/sampler.py), the command line's help and the docs read them from here. Values the
# numerics implement are defined next to them, in ops/.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "cluster.method": METHODS,
    "cluster.centroid": CENTROIDS,
    "cluster.backend": BACKENDS,
    "tangent.neighbourhood": ("radius", "knn", "node"),
    "tangent.schedule": SCHEDULES,
    "tangent.route": ROUTES,
    "sampler.sampler": ("ddpm", "ddim"),
    "sampler.cfg_channels": ("dit", "all"),
    "sampler.guidance": GUIDANCE_MODES,
    "sampler.sigma": SIGMA_MODES,
    "sampler.units": ("cross_class", "per_class"),
    "health.policy": ("keep", "regenerate"),
    "runtime.device": ("auto", "cuda", "cpu"),
}


def choices_text(name: str) -> str:
    """``a | b | c``: a field's allowed values, for help lines."""
    return " | ".join(CHOICES[name])


# (section, field) -> the default that reproduces the bytes made before the field existed: omitted from the
# hash at that value, so the config hash of every existing run is unchanged (tests/test_cli.py).
HASH_SKIPPED_DEFAULTS = {("sampler", "sigma"): "scalar", ("sampler", "trust_region"): 0.0,
                         ("sampler", "pull"): 0.1, ("sampler", "project_min_signal"): 0.0, ("sampler", "repulsion"): 0.0}
# The sample-health section (pipeline/distill/health.py, docs/health.md): hashed like any field, but left out at
# its defaults (a section left empty is dropped), so folders made before the check existed still resume.
HASH_SKIPPED_DEFAULTS.update({("health", "threshold"): 4.0, ("health", "policy"): "regenerate",
                              ("health", "max_attempts"): 3})


@dataclass
class DataConfig:
    path: str = ""              # ImageFolder root, parquet file, or built-in dataset name
    split: str = "train"        # sub-folder used when PATH/<split>/<class>/* exists
    class_map: str = ""         # optional file: "<folder name> <label id>" per line
    classes: str = ""           # optional subset: a file with one class folder per line, or a shipped
                                # list (imagenette, imagewoof, imagenet100)
    hflip: bool = False         # the public code flips at random before encoding; off = deterministic


@dataclass
class ModelConfig:
    model: str = DEFAULT_MODEL  # hub id or local folder (diffusers layout: transformer/, vae/)
    vae: str = DEFAULT_VAE      # hub id or local folder; "" = the model folder's own vae/
    revision: str = ""
    dtype: str = "auto"         # auto: bf16 on GPU, fp32 on CPU
    # Images per VAE call. Hashed: kernels are chosen by batch shape, so it decides the latent bytes;
    # runtime.encode_batch_size (rows per Ray Data batch) does not, since each batch is cut into these.
    encode_batch: int = 64


@dataclass
class ClusterConfig:
    method: str = "divisive"    # divisive (ManifoldGD) | kmeans (MGD3)
    branching: int = 2          # the divisive tree grows to branching x IPC leaves
    start_level: int = -1       # -1 = the default level of ops.selection.select_ipc_nodes
    centroid: str = "mean"      # mean | medoid
    # Where stage 2 runs (ops/backend.py): numpy (CPU) | cupy (this project's 2-means on the GPU, numpy's
    # seeding: the same tree up to float rounding) | cuml (RAPIDS KMeans, its own seeding) | auto (cupy
    # where CuPy sees a GPU in the plan task, numpy otherwise; never cuml). Recorded per class in the plan.
    backend: str = "auto"


@dataclass
class TangentConfig:
    dim: int = 3                    # tangent dimension d (published: 3)
    variance_fraction: float = 0.0  # > 0: smallest d explaining this fraction (capped by neighbours - 1)
    neighbourhood: str = "radius"   # radius (annealed) | knn | node
    neighbours: int = 12            # K: knn size, and the radius = distance to the K-th nearest latent
    max_neighbours: int = 256
    schedule: str = "exp"           # linear | cosine | exp
    warm_steps: int = 10            # guided steps over which the radius anneals to its base value
    max_multiplier: float = 2.0     # r_eff = r * max_multiplier at the first guided step
    # svd (thin SVD of the K x D neighbours) | gram (eigh of their K x K Gram matrix): the same basis to
    # ~1e-7 rad; gram was 5-10x faster on numpy and 2-6x on CuPy (docs/scale.md, bench/ops.py --only routes)
    route: str = "gram"


@dataclass
class SamplerSection:
    sampler: str = "ddpm"       # ddpm (DiT protocol, learned variance) | ddim (eta 0)
    num_steps: int = 50
    train_steps: int = 1000
    cfg_scale: float = 4.0
    cfg_channels: str = "dit"   # dit: first 3 latent channels, as DiT | all: as diffusers' DiTPipeline
    guidance: str = "manifold"  # none (DiT) | mode (MGD3) | manifold (ManifoldGD) | public: CHOICES["sampler.guidance"]
    guidance_scale: float = 0.1  # lambda
    t_stop: int = 25            # guided while the respaced step index i > t_stop (i = num_steps-1 .. 0)
    normal_weight: float = 0.0
    # sigma_i of the guidance term lambda sigma_i g (ops/guidance.py:guidance_sigma): scalar (one number per
    # sample, the geometric mean of the step's std; keeps a manifold step in span(U)) | elementwise (the
    # step's per-coordinate std, as the public MGD3 / ManifoldGD code). They differ only late in sampling:
    # within 0.8% at every step guided with t_stop 25, up to 7.9x at t_stop 0 (docs/sampler.md).
    sigma: str = "scalar"
    # > 0: a trust region on the guided step: lambda g is scaled down, per sample, to at most this RMS per
    # coordinate, so one guided step moves x_t by at most trust_region noise std's (docs/health.md). 0 = off.
    trust_region: float = 0.0
    # public guidance (the public ManifoldGD code's variant): the length of the unit pull toward the tangent
    # plane added to the whole mode term (ops/guidance.py; docs/method.md section 7).
    pull: float = 0.1
    # manifold guidance: project onto the tangent space only at steps whose signal coefficient sqrt(abar) is at
    # least this (noise-aware projection); below it the step uses the whole mode term. 0 = every step (the
    # paper). On DiT's 50 steps sqrt(abar) is 0.006 at i = 49, 0.06 at i = 37, 0.19 at i = 28, 0.8 at i = 10.
    project_min_signal: float = 0.0
    # > 0: a diversity term among the samples of a class sampled together, added to g with this weight
    # (ops/guidance.py:repulsion). Couples the rows of a batch: their bytes depend on the batch cut (hashed).
    repulsion: float = 0.0
    # Samples per model call (CFG doubles it). Hashed: BLAS picks kernels by batch size, so another
    # max_batch can move a pixel by one grey level; a rerun must use the same value to resume bytes.
    max_batch: int = 64
    # How samples are cut into sampling calls (work units). cross_class: classes in label order, their
    # (class, k) samples concatenated and cut into chunks of max_batch, so IPC 1 and 10 still fill a batch;
    # per_class: each class's samples chunked on their own (the layout before cross-class units). Hashed:
    # the batch a sample shares can move a pixel by one grey level.
    units: str = "cross_class"


@dataclass
class HealthConfig:
    # After sampling, each final latent's distance to its class's nearest real latent, over the class's own
    # median nearest-neighbour spacing (ops/health.py); above the threshold the sample is flagged.
    threshold: float = 4.0
    policy: str = "regenerate"  # CHOICES["health.policy"]: keep (record, report) | regenerate (docs/health.md)
    max_attempts: int = 3       # regenerate: noise attempts per sample, the first one included


@dataclass
class RuntimeConfig:
    encode_batch_size: int = 64
    encode_actors: int = 0      # 0 = sized from the cluster's free resources
    sample_actors: int = 0      # 0 = one per GPU (per gpus_per_sample_actor), or one per CPU
    progress: bool = True
    device: str = "auto"        # auto: GPUs when the cluster has one now | cuda: always ask for GPUs (an
                                # autoscaler then adds GPU nodes) | cpu: never ask for GPUs
    gpus_per_sample_actor: float = 1.0  # with GPUs; a fraction packs several sampling actors on one GPU
    gpus_per_plan_task: float = 0.25   # with GPUs: a stage-2 task's share of one, so cluster.backend auto
                                       # (or cupy / cuml) finds a device; 0 keeps stage 2 on CPU-only workers
    max_unit_attempts: int = 3  # tries of one sampling unit (any error, a lost actor or node) before failing
    unit_timeout_s: float = 0.0  # > 0: a unit running longer is abandoned (its actor restarted) and retried

    def use_gpu(self, cluster_gpus: float) -> bool:
        """Whether stages ask Ray for GPUs, given the GPUs the cluster has now."""
        return self.device == "cuda" or (self.device == "auto" and cluster_gpus > 0)


@dataclass
class DistillConfig:
    data: DataConfig = field(default_factory=DataConfig)
    out: str = ""
    ipc: int = 10
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tangent: TangentConfig = field(default_factory=TangentConfig)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    health: HealthConfig = field(default_factory=HealthConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hashed_dict(self) -> dict:
        """What decides the output bytes: everything but ``runtime`` and the output path, plus a digest of
        the model's files where the model is a built-in or local folder (its name does not change when it
        is retrained). Fields of ``HASH_SKIPPED_DEFAULTS`` are left out while they hold that default."""
        d = self.to_dict()
        d.pop("runtime")
        d.pop("out")
        for (section, name), default in HASH_SKIPPED_DEFAULTS.items():
            if d[section][name] == default:
                del d[section][name]
        for section in [k for k, v in d.items() if v == {}]:
            del d[section]
        fingerprint = model_fingerprint(self.model)
        if fingerprint:
            d["model"]["fingerprint"] = fingerprint
        return d

    def config_hash(self) -> str:
        blob = json.dumps(self.hashed_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _coerce(value, target_type, name: str):
    """Turn a YAML / command-line value into the field's declared type."""
    if target_type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(name, f"expected true/false, got {value!r}")
    if target_type in (int, float):
        if isinstance(value, bool):
            raise ConfigError(name, f"expected a number, got {value!r}")
        try:
            number = float(value) if target_type is float else int(str(value), 0)
        except (TypeError, ValueError):
            raise ConfigError(name, f"expected {target_type.__name__}, got {value!r}") from None
        return number
    if target_type is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return str(value)
    return value


def _apply(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(name, "unknown field")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(name, "expected a mapping")
            _apply(current, value, prefix=f"{name}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], name))


def parse_set(assignments: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> nested dict (values parsed as YAML scalars)."""
    tree: dict = {}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(item, "--set takes key=value")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return tree


def preset_names() -> list[str]:
    """The distill presets shipped in the package (``pipeline/presets/<name>.yaml``)."""
    return sorted(p.name[:-5] for p in files("pipeline.presets").iterdir() if p.name.endswith(".yaml"))


def config_path(path: str | Path) -> Path:
    """A config file's path, or a bare preset name (``imagenet1k_ipc50``) resolved to the packaged preset.
    A file of that name in the working directory wins over the preset."""
    p = Path(path)
    if not p.exists() and p.parent == Path(".") and p.name.removesuffix(".yaml") in preset_names():
        return Path(str(files("pipeline.presets") / f"{p.name.removesuffix('.yaml')}.yaml"))
    return p


def load_yaml(path: str | Path) -> dict:
    try:
        text = config_path(path).read_text()
    except OSError as exc:
        hint = "" if Path(path).parent != Path(".") else f" (nor a packaged preset: {', '.join(preset_names())})"
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}{hint}") from None
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping")
    return data.get("distill", data)  # presets may nest everything under `distill:`


def build_config(*layers: dict) -> DistillConfig:
    cfg = DistillConfig()
    for layer in layers:
        if layer:
            _apply(cfg, layer)
    return cfg


def check_choices(obj, section: str = "") -> None:
    """Raise ConfigError for the first enumerated field of ``obj`` (the whole config, or one ``section``
    of it) whose value is not one of ``CHOICES``."""
    for name, options in CHOICES.items():
        sec, key = name.split(".")
        if section and sec != section:
            continue
        value = getattr(obj if section else getattr(obj, sec), key)
        if value not in options:
            raise ConfigError(name, f"must be one of {', '.join(options)}; got {value!r}")


def validate(cfg: DistillConfig, *, need_paths: bool = True) -> DistillConfig:
    """Check every value once; raise ConfigError naming the first bad field."""
    if need_paths and not cfg.data.path:
        raise ConfigError("data.path", "is required (--data)")
    if need_paths and not cfg.out:
        raise ConfigError("out", "is required (--out)")
    if cfg.ipc <= 0:
        raise ConfigError("ipc", f"must be a positive integer, got {cfg.ipc}")
    if cfg.seed < 0:
        raise ConfigError("seed", f"must be >= 0, got {cfg.seed}")
    if not cfg.model.model:
        raise ConfigError("model.model", "is required")
    check_choices(cfg)
    if cfg.cluster.branching < 1:
        raise ConfigError("cluster.branching", f"must be >= 1, got {cfg.cluster.branching}")
    _check_tangent(cfg.tangent)
    _check_sampler(cfg.sampler)
    _check_health(cfg.health)
    if cfg.model.encode_batch <= 0:
        raise ConfigError("model.encode_batch", f"must be positive, got {cfg.model.encode_batch}")
    _check_runtime(cfg.runtime)
    return absolute_paths(cfg)


def _check_tangent(t: TangentConfig) -> None:
    if t.dim <= 0:
        raise ConfigError("tangent.dim", f"must be positive, got {t.dim}")
    if t.neighbours < 2:
        raise ConfigError("tangent.neighbours", f"must be >= 2, got {t.neighbours}")
    if t.dim >= t.neighbours:
        raise ConfigError("tangent.dim", f"must be smaller than tangent.neighbours ({t.neighbours}), got {t.dim}")
    if t.max_neighbours < t.neighbours:
        raise ConfigError("tangent.max_neighbours", f"must be >= tangent.neighbours ({t.neighbours})")
    if not 0.0 <= t.variance_fraction <= 1.0:
        raise ConfigError("tangent.variance_fraction", f"must be in [0, 1], got {t.variance_fraction}")
    if t.warm_steps < 0:
        raise ConfigError("tangent.warm_steps", f"must be >= 0, got {t.warm_steps}")
    if t.max_multiplier < 1.0:
        raise ConfigError("tangent.max_multiplier", f"must be >= 1, got {t.max_multiplier}")


def _check_sampler(s: SamplerSection) -> None:
    if s.num_steps <= 0 or s.num_steps > s.train_steps:
        raise ConfigError("sampler.num_steps", f"must be in [1, train_steps={s.train_steps}], got {s.num_steps}")
    if not 0 <= s.t_stop <= s.num_steps:
        raise ConfigError("sampler.t_stop", f"must be in [0, num_steps={s.num_steps}], got {s.t_stop}")
    for name in ("cfg_scale", "guidance_scale", "normal_weight", "trust_region", "pull", "project_min_signal", "repulsion"):
        if getattr(s, name) < 0:
            raise ConfigError(f"sampler.{name}", f"must be >= 0, got {getattr(s, name)}")
    if s.max_batch <= 0:
        raise ConfigError("sampler.max_batch", f"must be positive, got {s.max_batch}")


def _check_health(h: HealthConfig) -> None:
    if not h.threshold > 0:
        raise ConfigError("health.threshold", f"must be > 0, got {h.threshold}")
    if h.max_attempts < 1:
        raise ConfigError("health.max_attempts", f"must be >= 1, got {h.max_attempts}")


def _check_runtime(r: RuntimeConfig) -> None:
    if r.encode_batch_size <= 0:
        raise ConfigError("runtime.encode_batch_size", f"must be positive, got {r.encode_batch_size}")
    for name in ("encode_actors", "sample_actors"):
        if getattr(r, name) < 0:
            raise ConfigError(f"runtime.{name}", f"must be >= 0, got {getattr(r, name)}")
    if not r.gpus_per_sample_actor > 0:
        raise ConfigError("runtime.gpus_per_sample_actor", f"must be > 0, got {r.gpus_per_sample_actor}")
    if r.gpus_per_sample_actor > 1 and r.gpus_per_sample_actor != int(r.gpus_per_sample_actor):
        raise ConfigError("runtime.gpus_per_sample_actor",
                          f"must be a fraction <= 1 or a whole number, got {r.gpus_per_sample_actor}")
    if not 0 <= r.gpus_per_plan_task <= 1:
        raise ConfigError("runtime.gpus_per_plan_task", f"must be in [0, 1], got {r.gpus_per_plan_task}")
    if r.max_unit_attempts < 1:
        raise ConfigError("runtime.max_unit_attempts", f"must be >= 1, got {r.max_unit_attempts}")
    if r.unit_timeout_s < 0:
        raise ConfigError("runtime.unit_timeout_s", f"must be >= 0, got {r.unit_timeout_s}")


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def absolute_paths(cfg: DistillConfig) -> DistillConfig:
    """Resolve every relative local path once, on the driver: Ray workers do not share its working directory.

    Built-in names, ``builtin:`` priors, hub ids and URLs (``s3://...``) stay as they are; a model reference is
    a path when it names an existing folder or can only be one (``./x``, ``../x``, ``a/b/c``).
    """
    def local(ref: str) -> bool:
        return bool(ref) and "://" not in ref and not ref.startswith("builtin:")

    if local(cfg.data.path) and cfg.data.path not in builtin_dataset_names():
        cfg.data.path = _absolute(cfg.data.path)
    if local(cfg.out):
        cfg.out = _absolute(cfg.out)
    for name in ("class_map", "classes"):
        value = getattr(cfg.data, name)
        if local(value) and Path(value).expanduser().is_file():
            setattr(cfg.data, name, _absolute(value))
    for name in ("model", "vae"):
        ref = getattr(cfg.model, name)
        if local(ref) and (Path(ref).expanduser().is_dir() or looks_like_path(ref)):
            setattr(cfg.model, name, _absolute(ref))
    return cfg


def to_yaml(cfg: DistillConfig) -> str:
    return yaml.safe_dump({"distill": cfg.to_dict()}, sort_keys=False)
