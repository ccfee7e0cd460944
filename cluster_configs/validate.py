"""Check the cluster configs offline, the way the cluster would, before anyone applies them.

    python cluster_configs/validate.py                 # every YAML in cluster_configs/
    python cluster_configs/validate.py my-rayjob.yaml  # or the files named

- RayCluster / RayJob manifests: against the `v1` openAPIV3Schema of the vendored KubeRay CRDs
  (`schemas/`), strictly: an unknown field is an error, as with `kubectl apply` (strict field validation).
  Then the rules KubeRay's operator enforces in code rather than in the schema: a container `command` only
  with the `ray.io/overwrite-container-cmd: "true"` annotation (otherwise the operator wraps it and appends
  its own `ray start`), a known `submissionMode`, replicas within [minReplicas, maxReplicas], every
  volumeMount backed by a pod volume.
- Ray cluster-launcher configs (a top-level `provider`): against Ray's own `ray/autoscaler/ray-schema.json`
  from the installed Ray (what `ray up` checks).
Other documents (PersistentVolumeClaims, presets) are skipped. Needs only PyYAML and jsonschema (both come
with Ray). Exit status 1 when anything fails.
"""
from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {"RayCluster": HERE / "schemas" / "ray.io_rayclusters.yaml",
        "RayJob": HERE / "schemas" / "ray.io_rayjobs.yaml"}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
OVERWRITE_CMD = "ray.io/overwrite-container-cmd"


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
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"],
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


def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec of a RayCluster or of a RayJob (its rayClusterSpec)."""
    return doc["spec"] if doc.get("kind") == "RayCluster" else doc["spec"].get("rayClusterSpec", {})


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(doc)
    pods = [("head", spec.get("headGroupSpec", {}).get("template", {}).get("spec", {}))]
    pods += [(f"worker group {g.get('groupName')}", g.get("template", {}).get("spec", {}))
             for g in spec.get("workerGroupSpecs", [])]
    return pods


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


def validate_doc(doc) -> list[str]:
    """Errors for one YAML document ([] when valid or not a kind this checks)."""
    if not isinstance(doc, dict):
        return []
    if doc.get("kind") in CRDS:
        errors = _schema_errors(doc, crd_schema(doc["kind"]))
        return errors or _operator_rules(doc)
    if "provider" in doc and "cluster_name" in doc:
        return _schema_errors(doc, launcher_schema())
    return []


def validate_file(path: Path) -> list[str]:
    errors = []
    for i, doc in enumerate(yaml.safe_load_all(Path(path).read_text())):
        errors += [f"{path.name}[{i}] {e}" for e in validate_doc(doc)]
    return errors


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or sorted(HERE.glob("*.yaml"))
    failed = 0
    for f in files:
        errors = validate_file(f)
        print(f"{'FAIL' if errors else 'ok  '} {f}")
        for e in errors:
            print(f"     {e}")
        failed += bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
