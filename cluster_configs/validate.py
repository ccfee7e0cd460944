"""Check the cluster configs offline, the way the cluster would, before anyone applies them.

    python cluster_configs/validate.py                 # every YAML in cluster_configs/
    python cluster_configs/validate.py my-rayjob.yaml  # or the files named

Every document of every file gets one line: `ok`, `FAIL` (with the reasons below it) or `skipped` (with why).

- RayCluster / RayJob manifests: against the `v1` openAPIV3Schema of the vendored KubeRay CRDs (`schemas/`),
  strictly: an unknown field is an error, as with `kubectl apply` (strict field validation). Then the rules
  KubeRay's operator enforces in code rather than in the schema (a container `command` only with the
  `ray.io/overwrite-container-cmd: "true"` annotation, a known `submissionMode`, replicas within
  [minReplicas, maxReplicas], every volumeMount backed by a pod volume), and the cross-field rules below.
- Core Kubernetes objects (PersistentVolumeClaim, Pod, ...): against Kubernetes' own OpenAPI schemas for
  Kubernetes K8S_VERSION, strictly, from the `kubernetes-validate` package (pinned in the dev extra; its schemas
  are generated from Kubernetes' API, Apache-2.0), plus what those schemas leave open: PVC access modes.
  Without the package these documents are reported as skipped.
- Ray cluster-launcher configs (a top-level `provider`): against Ray's own `ray/autoscaler/ray-schema.json`
  from the installed Ray (what `ray up` checks).
- Distill configs (`local.yaml`): through the project's own config loader, when the project is importable.

Cross-field rules (RayCluster / RayJob), each a way a manifest passes its schema and still fails on a cluster:
- `num-gpus` in rayStartParams equals the Ray container's `nvidia.com/gpu` limit;
- requests equal limits for every resource of every container (Ray sizes itself by the limits);
- the head schedules no work: `num-cpus: "0"`, `num-gpus: "0"`, no GPU;
- every image is pulled with `imagePullPolicy: Always` or named by digest (a rebuilt tag is otherwise not pulled
  on nodes that have the old one);
- a `/dev/shm` volume is a memory emptyDir at least as large as rayStartParams' `object-store-memory`;
- token auth is on (`authOptions.mode: token`);
- a RayJob's entrypoint: its `--config` resolves inside the image (a packaged preset name, or an absolute path
  on a volume the head mounts), and with GPU workers it sets `runtime.device=cuda`.
Exit status 1 when anything fails. Needs PyYAML and jsonschema (both come with Ray).
"""
from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PRESETS = HERE.parent / "pipeline" / "presets"
CRDS = {"RayCluster": HERE / "schemas" / "ray.io_rayclusters.yaml",
        "RayJob": HERE / "schemas" / "ray.io_rayjobs.yaml"}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
OVERWRITE_CMD = "ray.io/overwrite-container-cmd"
K8S_VERSION = "1.33"  # the Kubernetes whose core schemas are used (kubernetes-validate holds 1.25 to 1.37)
ACCESS_MODES = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")
GPU = "nvidia.com/gpu"


@dataclass
class Result:
    status: str                       # "ok", "FAIL" or "skipped"
    what: str                         # e.g. "RayJob manifoldgd-imagenet1k-ipc50"
    messages: list[str] = field(default_factory=list)  # the errors (FAIL) or the reason (skipped)


# ------------------------------------------------------------------------------------------------- schemas
def _strict(schema: dict) -> dict:
    """Forbid unknown fields wherever the schema lists its fields (Kubernetes would prune or reject them;
    jsonschema by itself lets them through), except where the CRD asks to keep unknown fields."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


@functools.cache
def crd_schema(kind: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML
    crd = yaml.load(CRDS[kind].read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    # apiVersion / kind / metadata are checked by the API server itself, not by the CRD's schema.
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"], "additionalProperties": False,
                                        "properties": {"name": {"type": "string", "minLength": 1},
                                                       "namespace": {"type": "string"},
                                                       "labels": {"type": "object"},
                                                       "annotations": {"type": "object"}}}
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return schema


@functools.cache
def launcher_schema() -> dict:
    import ray.autoscaler  # noqa: PLC0415

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _schema_errors(doc: dict, schema: dict) -> list[str]:
    import jsonschema  # noqa: PLC0415

    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


# ---------------------------------------------------------------------------------------------- structure
def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec of a RayCluster or of a RayJob (its rayClusterSpec)."""
    return doc["spec"] if doc.get("kind") == "RayCluster" else doc["spec"].get("rayClusterSpec", {})


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(doc)
    pods = [("head", spec.get("headGroupSpec", {}).get("template", {}).get("spec", {}))]
    pods += [(f"worker group {g.get('groupName')}", g.get("template", {}).get("spec", {}))
             for g in spec.get("workerGroupSpecs", [])]
    return pods


def groups(doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, rayStartParams, pod spec) for the head and each worker group."""
    spec = cluster_spec(doc)
    head = spec.get("headGroupSpec", {})
    out = [("head", head.get("rayStartParams") or {}, head.get("template", {}).get("spec", {}))]
    out += [(f"worker group {g.get('groupName')}", g.get("rayStartParams") or {}, g.get("template", {}).get("spec", {}))
            for g in spec.get("workerGroupSpecs", [])]
    return out


def _all_pods(doc: dict) -> list[tuple[str, dict]]:
    pods = pod_specs(doc)
    if doc.get("kind") == "RayJob" and doc["spec"].get("submitterPodTemplate"):
        pods.append(("submitter", doc["spec"]["submitterPodTemplate"].get("spec", {})))
    return pods


def _containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


# ---------------------------------------------------------------------------------------------- quantities
_SUFFIX = {"": 1, "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
           "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value) -> Fraction:
    """A Kubernetes quantity ("8", 8, "500m", "16Gi", "1e3") as an exact number."""
    m = re.fullmatch(r"([+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)([a-zA-Z]*)", str(value).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return Fraction(m.group(1)) * _SUFFIX[m.group(2)]


# ------------------------------------------------------------------------------------------- operator rules
def _operator_rules(doc: dict) -> list[str]:
    errors = []
    annotations = doc.get("metadata", {}).get("annotations") or {}
    for where, pod in pod_specs(doc):
        volumes = {v.get("name") for v in pod.get("volumes", [])}
        for c in pod.get("containers", []):
            if ("command" in c or "args" in c) and annotations.get(OVERWRITE_CMD) != "true":
                errors.append(f"{where}: container {c.get('name')} sets command/args without the "
                              f'{OVERWRITE_CMD}: "true" annotation; the operator would wrap it and append its own '
                              "`ray start`")
        for c in _containers(pod):
            for m in c.get("volumeMounts", []):
                if m.get("name") not in volumes:
                    errors.append(f"{where}: volumeMount {m.get('name')} has no pod volume of that name")
    for g in cluster_spec(doc).get("workerGroupSpecs", []):
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 0)
        if not lo <= g.get("replicas", lo) <= hi:
            errors.append(f"worker group {g.get('groupName')}: replicas must lie in [minReplicas, maxReplicas]")
    if doc.get("kind") == "RayJob":
        mode = doc["spec"].get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            errors.append(f"spec.submissionMode: {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
        if not doc["spec"].get("entrypoint") and mode != "InteractiveMode":
            errors.append("spec.entrypoint: required for this submissionMode")
    return errors


# ---------------------------------------------------------------------------------------- cross-field rules
def _container_rules(where: str, pod: dict) -> list[str]:
    """Rules for any pod's containers: requests == limits, images pulled fresh or by digest."""
    errors = []
    for c in _containers(pod):
        name = f"{where}: container {c.get('name')}"
        res = c.get("resources") or {}
        requests, limits = res.get("requests") or {}, res.get("limits") or {}
        for key in sorted(set(requests) | set(limits)):
            try:
                same = key in requests and key in limits and quantity(requests[key]) == quantity(limits[key])
            except ValueError as exc:
                errors.append(f"{name}: resources {key}: {exc}")
                continue
            if not same:
                errors.append(f"{name}: resources.requests.{key} ({requests.get(key, 'unset')}) != "
                              f"resources.limits.{key} ({limits.get(key, 'unset')}); set them equal")
        image = str(c.get("image", ""))
        if "@sha256:" not in image and c.get("imagePullPolicy") != "Always":
            errors.append(f"{name}: image {image} by tag needs imagePullPolicy: Always (got "
                          f"{c.get('imagePullPolicy', 'unset')}), or name the image by digest")
    return errors


def _presets() -> list[str]:
    if PRESETS.is_dir():
        return sorted(p.stem for p in PRESETS.glob("*.yaml"))
    try:
        from pipeline.config import preset_names  # noqa: PLC0415
    except ImportError:
        return []
    return preset_names()


def _entrypoint_rules(doc: dict) -> list[str]:
    entry = doc["spec"].get("entrypoint") or ""
    try:
        argv = shlex.split(entry)
    except ValueError as exc:
        return [f"spec.entrypoint: cannot be parsed ({exc})"]
    if argv[:1] == ["manifoldgd"]:
        args = argv[1:]
    elif argv[:3] == ["python", "-m", "pipeline"]:
        args = argv[3:]
    else:
        return []
    errors = []
    head_pod = pod_specs(doc)[0][1]
    mounts = [m.get("mountPath", "").rstrip("/") for c in head_pod.get("containers", [])[:1]
              for m in c.get("volumeMounts", [])]
    if "--config" in args:
        i = args.index("--config")
        value = args[i + 1] if i + 1 < len(args) else ""
        presets = _presets()
        if "/" not in value:
            if value.removesuffix(".yaml") not in presets:
                errors.append(f"spec.entrypoint: --config {value!r} is not a preset packaged in the image "
                              f"({', '.join(presets) or 'none found'})")
        elif not (value.startswith("/") and any(value.startswith(m + "/") for m in mounts if m)):
            errors.append(f"spec.entrypoint: --config {value!r} is not in the image: give a packaged preset's name "
                          f"or an absolute path on a volume the head mounts ({', '.join(mounts) or 'none'})")
    gpu_workers = [w for w, params, pod in groups(doc)[1:]
                   if any(quantity((c.get("resources") or {}).get("limits", {}).get(GPU, 0)) > 0
                          for c in pod.get("containers", [])[:1])]
    if args[:1] == ["distill"] and gpu_workers:
        sets = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
        if "runtime.device=cuda" not in sets:
            errors.append(f"spec.entrypoint: set `--set runtime.device=cuda` ({', '.join(gpu_workers)} has GPUs); "
                          "with the default `auto` a run started while no GPU pod is up goes on CPU")
    return errors


def _cross_field_rules(doc: dict) -> list[str]:
    errors = []
    auth = cluster_spec(doc).get("authOptions") or {}
    if auth.get("mode") != "token":
        errors.append(f"authOptions.mode: {auth.get('mode', 'unset')!r}; set it to token (the dashboard and job API "
                      "are otherwise open to anyone who reaches the head)")
    for where, params, pod in groups(doc):
        ray = (pod.get("containers") or [{}])[0]
        gpus = quantity((ray.get("resources") or {}).get("limits", {}).get(GPU, 0))
        if where == "head":
            for key in ("num-cpus", "num-gpus"):
                if str(params.get(key)) != "0":
                    errors.append(f'head: rayStartParams.{key} is {params.get(key, "unset")!r}; set it to "0" so '
                                  "the head schedules no work")
            if gpus > 0:
                errors.append(f"head: container {ray.get('name')} asks for {GPU}; the head schedules no work")
        elif "num-gpus" in params and quantity(params["num-gpus"]) != gpus:
            errors.append(f"{where}: rayStartParams.num-gpus ({params['num-gpus']}) != the {ray.get('name')} "
                          f"container's {GPU} limit ({gpus})")
        volumes = {v.get("name"): v for v in pod.get("volumes", [])}
        for c in pod.get("containers", []):
            for m in c.get("volumeMounts", []):
                if m.get("mountPath", "").rstrip("/") != "/dev/shm":
                    continue
                empty = (volumes.get(m.get("name")) or {}).get("emptyDir")
                store = params.get("object-store-memory")
                if empty is None or empty.get("medium") != "Memory":
                    errors.append(f"{where}: /dev/shm ({m.get('name')}) must be an emptyDir with medium: Memory")
                elif store is None or "sizeLimit" not in empty or quantity(empty["sizeLimit"]) < quantity(store):
                    errors.append(f"{where}: /dev/shm sizeLimit ({empty.get('sizeLimit', 'unset')}) must be at least "
                                  f"rayStartParams.object-store-memory ({store or 'unset'}); or drop the volume and "
                                  "let KubeRay size it")
    for where, pod in _all_pods(doc):
        errors += _container_rules(where, pod)
    if doc.get("kind") == "RayJob":
        errors += _entrypoint_rules(doc)
    return errors


# ------------------------------------------------------------------------------------------ core objects
def _core_rules(doc: dict) -> list[str]:
    errors = []
    kind = doc.get("kind")
    if kind in ("PersistentVolumeClaim", "PersistentVolume"):
        for mode in (doc.get("spec") or {}).get("accessModes") or []:
            if mode not in ACCESS_MODES:
                errors.append(f"spec.accessModes: {mode!r} is not one of {', '.join(ACCESS_MODES)}")
    if kind == "Pod":
        errors += _container_rules("pod", doc.get("spec") or {})
    return errors


def _check_core(doc: dict, what: str) -> Result:
    try:
        import kubernetes_validate  # noqa: PLC0415
    except ImportError:
        return Result("skipped", what, ["kubernetes-validate is not installed (the dev extra has it: `make install`)"])
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "<root>"
        return Result("FAIL", what, [f"{where}: {e.message}"] + _core_rules(doc))
    except kubernetes_validate.SchemaNotFoundError as e:
        return Result("skipped", what, [f"no Kubernetes {K8S_VERSION} schema for {e.kind} {e.api_version}"])
    errors = _core_rules(doc)
    return Result("FAIL" if errors else "ok", what, errors)


def _check_distill_config(path: Path | None, what: str) -> Result:
    try:
        from pipeline.common.errors import ConfigError  # noqa: PLC0415
        from pipeline.config import build_config, load_yaml, validate  # noqa: PLC0415
    except ImportError:
        return Result("skipped", what, ["the project is not importable here (install it to check distill configs)"])
    if path is None:
        return Result("skipped", what, ["a distill config is checked from its file"])
    try:
        validate(build_config(load_yaml(path)))
    except ConfigError as exc:
        return Result("FAIL", what, [str(exc)])
    return Result("ok", what)


# ------------------------------------------------------------------------------------------------ dispatch
def check_doc(doc, path: Path | None = None) -> Result:
    if not isinstance(doc, dict):
        return Result("skipped", "a non-mapping document", ["not a mapping"])
    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name", "?")
    what = f"{kind} {name}" if kind else "document"
    if kind in CRDS:
        errors = _schema_errors(doc, crd_schema(kind))
        if not errors:
            errors = _operator_rules(doc) + _cross_field_rules(doc)
        return Result("FAIL" if errors else "ok", what, errors)
    if "provider" in doc and "cluster_name" in doc:
        errors = _schema_errors(doc, launcher_schema())
        return Result("FAIL" if errors else "ok", f"Ray cluster launcher {doc.get('cluster_name')}", errors)
    if kind and "apiVersion" in doc:
        if str(doc["apiVersion"]).startswith("ray.io/"):
            return Result("FAIL", what, [f"kind: {kind!r} is not a KubeRay kind this checks ({', '.join(CRDS)})"])
        return _check_core(doc, what)
    if "distill" in doc:
        return _check_distill_config(path, "distill config")
    return Result("skipped", what, ["not a kind this checks (no apiVersion/kind, launcher or distill config)"])


def validate_doc(doc) -> list[str]:
    """Errors for one YAML document ([] when valid or skipped)."""
    result = check_doc(doc)
    return result.messages if result.status == "FAIL" else []


def check_file(path: Path) -> list[Result]:
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        return [Result("FAIL", "file", [f"cannot read: {exc}".splitlines()[0]])]
    return [check_doc(d, Path(path)) for d in docs]


def validate_file(path: Path) -> list[str]:
    return [f"{Path(path).name}[{i}] {m}" for i, r in enumerate(check_file(path)) if r.status == "FAIL"
            for m in r.messages]


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or sorted(HERE.glob("*.yaml"))
    failed = 0
    for f in files:
        for i, r in enumerate(check_file(f)):
            label = f"{f.name}[{i}] {r.what}"
            if r.status == "skipped":
                print(f"skipped {label}: {'; '.join(r.messages)}")
                continue
            print(f"{'FAIL' if r.status == 'FAIL' else 'ok  '}    {label}")
            for m in r.messages:
                print(f"        {m}")
            failed += r.status == "FAIL"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
