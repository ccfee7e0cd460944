"""The deployment, checked offline as the cluster would check it.

- Every YAML under cluster_configs/ parses; every packaged preset (and the local config) loads through the
  project's config loader, by path and by bare name.
- RayCluster / RayJob manifests validate against the vendored KubeRay v1 CRDs (strictly), the launcher config
  against Ray's own ray-schema.json; the validator rejects broken manifests (so these checks can fail).
- Image, Ray version, install script and volumes agree across Dockerfile, manifests and pyproject.toml.
- The lock holds exactly the project's dependency closure; `.rayignore` keeps the working_dir upload small.
- slow: the RayJob's entrypoint runs (--dry-run) from a venv where the project comes from a built wheel,
  outside the repo, installed by the same script as the Dockerfile's.
- cluster + slow: `ray job submit --working-dir` against a local head whose Python lacks the project.
"""
from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import free_port, stop_process_group, wait_for_dashboard, write_image_folder

from pipeline.config import build_config, load_yaml, validate

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "cluster_configs"
CONFIGS = sorted(ROOT.glob("*.yaml"))  # the deployable files (schemas/ holds the vendored CRDs, read by validate.py)
PRESETS = sorted((REPO / "pipeline" / "presets").glob("*.yaml"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RAY_VERSION = next(re.search(r"==([\w.]+)", d).group(1) for d in PYPROJECT["project"]["dependencies"]
                   if d.startswith("ray["))
IMAGE = re.compile(r"^[\w.\-/:]+/manifoldgd:" + re.escape(PYPROJECT["project"]["version"]) + "$")

sys.path.insert(0, str(ROOT))
import validate as cfgcheck  # noqa: E402  (cluster_configs/validate.py)


def _load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / name).read_text()) if d]


def _job() -> dict:
    return _load("kuberay-rayjob.yaml")[0]


# ------------------------------------------------------------------------------------------ files, presets
def test_the_expected_files_exist():
    names = {p.name for p in CONFIGS}
    for required in ("local.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-volumes.yaml",
                     "kuberay-staging.yaml", "aws-cluster.yaml"):
        assert required in names
    for ds in ("imagenette", "imagewoof", "imagenet100", "imagenet1k"):
        for ipc in (10, 50):
            assert f"{ds}_ipc{ipc}.yaml" in {p.name for p in PRESETS}
    for f in ("Dockerfile", ".dockerignore", ".rayignore", "scripts/install.sh", "requirements/lock-cpu.txt",
              "requirements/lock-runtime.txt", "requirements/lock-gpu.txt", "cluster_configs/schemas/LICENSE",
              "cluster_configs/schemas/README.md"):
        assert (REPO / f).is_file(), f


@pytest.mark.parametrize("path", CONFIGS + PRESETS, ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", PRESETS + [ROOT / "local.yaml"], ids=lambda p: p.name)
def test_preset_loads_through_config_loader(path):
    cfg = validate(build_config(load_yaml(path)))
    if path.parent.name == "presets":
        assert cfg.ipc == int(path.stem.rsplit("ipc", 1)[1])
        assert cfg.sampler.guidance == "manifold" and cfg.model.model == "facebook/DiT-XL-2-256"


def test_a_bare_preset_name_loads_the_packaged_preset(tmp_path, monkeypatch):
    from pipeline.config import ConfigError, preset_names

    assert preset_names() == sorted(p.stem for p in PRESETS)
    monkeypatch.chdir(tmp_path)  # not the repo: the name must resolve through the package
    assert load_yaml("imagenet1k_ipc50") == load_yaml(PRESETS[[p.stem for p in PRESETS].index("imagenet1k_ipc50")])
    assert load_yaml("imagenette_ipc10.yaml")["ipc"] == 10
    (tmp_path / "imagenette_ipc10").write_text("ipc: 7\n")  # a file of that name in the working directory wins
    assert load_yaml("imagenette_ipc10")["ipc"] == 7
    with pytest.raises(ConfigError, match="nor a packaged preset: .*imagenet1k_ipc50"):
        load_yaml("imagenet1k_ipc5")
    with pytest.raises(ConfigError, match="cannot read sub/imagenet1k_ipc50.yaml: No such file"):
        load_yaml("sub/imagenet1k_ipc50.yaml")


# ------------------------------------------------------------------------------- schemas: CRDs, ray-schema
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_against_crds_and_ray_schema(path):
    assert cfgcheck.validate_file(path) == []


def test_every_manifest_kind_is_checked():
    kinds = [d.get("kind", "launcher" if "provider" in d else None) for p in CONFIGS for d in _load(p.name)]
    assert {"RayCluster", "RayJob", "launcher"} <= set(kinds)


def _broken(doc: dict, edit) -> list[str]:
    doc = copy.deepcopy(doc)
    edit(doc)
    return cfgcheck.validate_doc(doc)


def test_the_validator_rejects_broken_manifests():
    job, cluster = _job(), _load("kuberay-raycluster.yaml")[0]
    launcher = _load("aws-cluster.yaml")[0]
    worker = lambda d: cfgcheck.cluster_spec(d)["workerGroupSpecs"][0]  # noqa: E731
    cases = {
        "a required field missing (maxReplicas)": (job, lambda d: worker(d).pop("maxReplicas"), "maxReplicas"),
        "no headGroupSpec": (cluster, lambda d: d["spec"].pop("headGroupSpec"), "headGroupSpec"),
        "a misspelt field": (job, lambda d: d["spec"].update(submisionMode="K8sJobMode"), "submisionMode"),
        "a wrong type": (job, lambda d: worker(d).update(replicas="8"), "replicas"),
        "a container without its name": (
            cluster, lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"), "name"),
        "a command without the annotation": (
            cluster, lambda d: worker(d)["template"]["spec"]["containers"][0].update(
                command=["/bin/bash", "-lc", "--"], args=["pip install x && $KUBERAY_GEN_RAY_START_CMD"]),
            "overwrite-container-cmd"),
        "an unknown submissionMode": (job, lambda d: d["spec"].update(submissionMode="K8sMode"), "submissionMode"),
        "replicas above maxReplicas": (cluster, lambda d: worker(d).update(replicas=99), "replicas"),
        "a mount without a volume": (
            job, lambda d: worker(d)["template"]["spec"]["volumes"].pop(0), "shared"),
        "a launcher node type without resources": (
            launcher, lambda d: d["available_node_types"]["gpu_worker"].pop("resources"), "resources"),
        "a launcher docker typo": (launcher, lambda d: d["docker"].update(imag="x"), "imag"),
    }
    for what, (doc, edit, needle) in cases.items():
        errors = _broken(doc, edit)
        assert errors and any(needle in e for e in errors), f"{what}: {errors}"


def test_the_command_annotation_allows_a_command():
    cluster = copy.deepcopy(_load("kuberay-raycluster.yaml")[0])
    cluster["metadata"]["annotations"] = {"ray.io/overwrite-container-cmd": "true"}
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
        command=["/bin/bash", "-lc", "--"], args=["ulimit -n 65536 && $KUBERAY_GEN_RAY_START_CMD"])
    assert cfgcheck.validate_doc(cluster) == []


# ------------------------------------------------------------------------------------- cross-field rules
def _head(d: dict) -> dict:
    return cfgcheck.cluster_spec(d)["headGroupSpec"]


def _ray(pod_owner: dict) -> dict:
    return pod_owner["template"]["spec"]["containers"][0]


def _entry(d: dict, old: str, new: str) -> None:
    assert old in d["spec"]["entrypoint"]
    d["spec"]["entrypoint"] = d["spec"]["entrypoint"].replace(old, new)


def test_the_validator_rejects_broken_cross_field_rules():
    job, cluster = _job(), _load("kuberay-raycluster.yaml")[0]
    worker = lambda d: cfgcheck.cluster_spec(d)["workerGroupSpecs"][0]  # noqa: E731

    def shm(d, size, store=None):
        pod = worker(d)["template"]["spec"]
        pod["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}})
        _ray(worker(d))["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
        if store:
            worker(d)["rayStartParams"]["object-store-memory"] = store

    cases = {
        "num-gpus != the GPU limit": (job, lambda d: worker(d)["rayStartParams"].update({"num-gpus": "2"}), "num-gpus"),
        "a GPU limit without num-gpus to match": (
            cluster, lambda d: _ray(worker(d))["resources"]["limits"].update({"nvidia.com/gpu": "2"}), "nvidia.com/gpu"),
        "requests below limits": (
            cluster, lambda d: _ray(worker(d))["resources"]["requests"].update(cpu="4"), "requests.cpu"),
        "a limit without a request": (
            job, lambda d: _ray(_head(d))["resources"]["requests"].pop("memory"), "requests.memory"),
        "head without num-gpus: 0": (job, lambda d: _head(d)["rayStartParams"].pop("num-gpus"), "num-gpus"),
        "head with CPUs for work": (cluster, lambda d: _head(d)["rayStartParams"].update({"num-cpus": "4"}), "num-cpus"),
        "head with a GPU": (job, lambda d: [_ray(_head(d))["resources"][k].update({"nvidia.com/gpu": "1"})
                                            for k in ("requests", "limits")], "asks for nvidia.com/gpu"),
        "a tag pulled IfNotPresent": (
            cluster, lambda d: _ray(worker(d)).update(imagePullPolicy="IfNotPresent"), "imagePullPolicy"),
        "an init container with no pull policy": (
            job, lambda d: _head(d)["template"]["spec"]["initContainers"][0].pop("imagePullPolicy"), "imagePullPolicy"),
        "a submitter with no pull policy": (
            job, lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0].pop("imagePullPolicy"),
            "submitter"),
        "a /dev/shm volume without object-store-memory": (job, lambda d: shm(d, "16Gi"), "object-store-memory"),
        "a /dev/shm volume smaller than the object store": (cluster, lambda d: shm(d, "8Gi", "16Gi"), "/dev/shm"),
        "token auth off": (cluster, lambda d: d["spec"].pop("authOptions"), "authOptions.mode"),
        "token auth disabled": (job, lambda d: cfgcheck.cluster_spec(d)["authOptions"].update(mode="disabled"),
                                "authOptions.mode"),
        "a --config preset the image lacks": (
            job, lambda d: _entry(d, "imagenet1k_ipc50", "imagenet1k_ipc5"), "not a preset packaged in the image"),
        "a --config path relative to a checkout": (
            job, lambda d: _entry(d, "imagenet1k_ipc50", "pipeline/presets/imagenet1k_ipc50.yaml"), "not in the image"),
        "a --config path on no volume": (
            job, lambda d: _entry(d, "imagenet1k_ipc50", "/home/ray/my.yaml"), "not in the image"),
        "a GPU entrypoint without runtime.device=cuda": (
            job, lambda d: _entry(d, "--set runtime.device=cuda", ""), "runtime.device=cuda"),
        "a GPU entrypoint with runtime.device=auto": (
            job, lambda d: _entry(d, "runtime.device=cuda", "runtime.device=auto"), "runtime.device=cuda"),
        "a metadata typo": (cluster, lambda d: d["metadata"].update(lables={"a": "b"}), "lables"),
    }
    for what, (doc, edit, needle) in cases.items():
        errors = _broken(doc, edit)
        assert errors and any(needle in e for e in errors), f"{what}: {errors}"


def test_the_cross_field_rules_allow_what_they_should():
    job, cluster = _job(), _load("kuberay-raycluster.yaml")[0]
    worker = lambda d: cfgcheck.cluster_spec(d)["workerGroupSpecs"][0]  # noqa: E731

    def shm_matching(d):
        worker(d)["template"]["spec"]["volumes"].append(
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}})
        _ray(worker(d))["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
        worker(d)["rayStartParams"]["object-store-memory"] = str(16 * 2**30)

    fine = {
        "an image by digest, no pull policy": (cluster, lambda d: _ray(worker(d)).update(
            image="registry.example.com/manifoldgd@sha256:" + "0" * 64, imagePullPolicy="IfNotPresent")),
        "equal quantities written differently": (cluster, lambda d: _ray(worker(d))["resources"]["requests"].update(
            memory="65536Mi", cpu="8000m")),
        "no num-gpus (Ray reads the limit)": (cluster, lambda d: worker(d)["rayStartParams"].pop("num-gpus")),
        "a /dev/shm volume as large as the object store": (cluster, shm_matching),
        "a --config file on the shared volume": (job, lambda d: _entry(d, "imagenet1k_ipc50", "/shared/cfg/in1k.yaml")),
        "a preset named with .yaml": (job, lambda d: _entry(d, "imagenet1k_ipc50", "imagenet1k_ipc50.yaml")),
    }
    for what, (doc, edit) in fine.items():
        assert _broken(doc, edit) == [], what


def test_core_objects_are_checked_against_kubernetes_schemas():
    pytest.importorskip("kubernetes_validate")
    pvc, staging = _load("kuberay-volumes.yaml")[1], _load("kuberay-staging.yaml")[0]
    cases = {
        "an access mode typo": (pvc, lambda d: d["spec"].update(accessModes=["ReadOnlyMan"]), "accessModes"),
        "a metadata typo": (pvc, lambda d: d["metadata"].update(lables={"a": "b"}), "lables"),
        "a misplaced field": (pvc, lambda d: d["spec"].update(storage="200Gi"), "storage"),
        "a wrong type": (pvc, lambda d: d["spec"].update(accessModes="ReadWriteMany"), "accessModes"),
        "a pod container typo": (staging, lambda d: d["spec"]["containers"][0].update(imagePulPolicy="Always"),
                                 "imagePulPolicy"),
        "a pod pulling a tag IfNotPresent": (
            staging, lambda d: d["spec"]["containers"][0].update(imagePullPolicy="IfNotPresent"), "imagePullPolicy"),
    }
    for what, (doc, edit, needle) in cases.items():
        errors = _broken(doc, edit)
        assert errors and any(needle in e for e in errors), f"{what}: {errors}"


def test_the_validator_prints_a_line_per_document_and_skips_what_it_cannot_check(tmp_path, capsys, monkeypatch):
    assert cfgcheck.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    docs = sum(len(_load(p.name)) for p in CONFIGS)
    assert len(out) == docs and all(line.startswith("ok ") for line in out), out  # every shipped document checked
    odd = tmp_path / "odd.yaml"
    odd.write_text("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n---\nfoo: 1\n")
    assert cfgcheck.main([str(odd)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.startswith("skipped odd.yaml[") for line in out), out
    monkeypatch.setitem(sys.modules, "kubernetes_validate", None)  # as on a machine without the package
    assert cfgcheck.main([str(ROOT / "kuberay-volumes.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped kuberay-volumes.yaml") == 2 and "kubernetes-validate is not installed" in out


@pytest.mark.parametrize("name, old, new, needle", [
    ("kuberay-volumes.yaml", "accessModes: [ReadWriteMany]", "accessModes: [ReadWriteMny]", "accessModes"),
    ("kuberay-volumes.yaml", "metadata:\n  name: manifoldgd-data", "metadata:\n  lables: {}\n  name: manifoldgd-data",
     "lables"),
    ("kuberay-staging.yaml", "imagePullPolicy: Always", "imagePullPolicy: IfNotPresent", "imagePullPolicy"),
    ("kuberay-raycluster.yaml", 'num-gpus: "1"', 'num-gpus: "2"', "num-gpus"),
    ("kuberay-rayjob.yaml", "\n    --set runtime.device=cuda\n", "\n", "runtime.device=cuda"),
    ("kuberay-rayjob.yaml", "--config imagenet1k_ipc50", "--config in1k.yaml", "preset"),
    ("local.yaml", "ipc: 10", "ipc: -1", "ipc"),
], ids=lambda v: v if isinstance(v, str) and v.endswith(".yaml") else None)
def test_validate_py_fails_on_a_broken_copy_of_each_file(tmp_path, capsys, name, old, new, needle):
    if name in ("kuberay-volumes.yaml", "kuberay-staging.yaml"):
        pytest.importorskip("kubernetes_validate")
    text = (ROOT / name).read_text()
    assert old in text
    broken = tmp_path / name
    broken.write_text(text.replace(old, new, 1))
    assert cfgcheck.main([str(broken)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL    {name}[" in out and needle in out, out
    assert cfgcheck.main([str(ROOT / name)]) == 0  # the shipped file passes


def test_cluster_commands_in_the_docs_ask_for_gpus():
    """Every `manifoldgd distill` / `python -m pipeline distill` submitted to a cluster in the docs sets
    runtime.device=cuda, like the RayJob (a run started while the GPU group is at 0 pods would go on CPU)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    texts = {"README.md": section, "cluster_configs/README.md": (ROOT / "README.md").read_text()}
    for name, text in texts.items():
        commands = re.sub(r"\\\n\s*", " ", text).splitlines()
        submits = [c for c in commands if "ray job submit" in c and " distill" in c]
        assert submits, name
        for c in submits:
            assert "runtime.device=cuda" in c, f"{name}: {c}"



def test_the_walkthrough_waits_builds_for_the_nodes_and_states_the_worst_case():
    text = (ROOT / "README.md").read_text()
    readme = (REPO / "README.md").read_text()
    builds = [ln for t in (text, readme, (REPO / "Dockerfile").read_text()) for ln in t.splitlines()
              if "docker build" in ln]
    assert builds and all("--platform linux/amd64" in ln for ln in builds), builds
    walk = text.split("## Build -> push", 1)[1].split("\n## ", 1)[0]
    lines = walk.splitlines()
    for i, ln in enumerate(lines):  # a pod is waited for before anything runs in it
        if re.search(r"kubectl (exec|cp)", ln):
            assert any("kubectl wait" in prev and "manifoldgd-stage" in prev for prev in lines[:i]), ln
    applies = [i for i, ln in enumerate(lines) if "kubectl apply" in ln and "kuberay-staging" in ln]
    for i in applies:
        assert "kubectl wait --for=condition=Ready pod/manifoldgd-stage" in lines[i + 1], lines[i + 1]
    spec = _job()["spec"]
    workers = cfgcheck.cluster_spec(_job())["workerGroupSpecs"][0]
    gpus = workers["replicas"] * int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    hours = (spec["backoffLimit"] + 1) * spec["activeDeadlineSeconds"] / 3600
    flat = " ".join(text.split())
    assert f"{hours:.0f} hours of {gpus} GPUs, **{hours * gpus:.0f} GPU-hours**" in flat  # from the manifest's numbers
    assert "512 MiB" in text and "100 MiB" not in text and "100 MiB" not in readme


def test_every_claim_exists_and_the_init_step_prepares_what_the_run_writes():
    claims = {d["metadata"]["name"] for d in _load("kuberay-volumes.yaml") if d["kind"] == "PersistentVolumeClaim"}
    job = _job()
    argv = shlex.split(job["spec"]["entrypoint"])
    out = argv[argv.index("--out") + 1]
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-staging.yaml"):
        doc = _load(name)[0]
        pods = [doc["spec"]] if doc["kind"] == "Pod" else [pod for _, pod in cfgcheck.pod_specs(doc)]
        for pod in pods:
            used = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
            assert used <= claims, (name, used - claims)
        head = pods[0]
        (init,) = head["initContainers"]
        script = init["command"][-1]
        assert init["securityContext"]["runAsUser"] == 0  # root, to chown a root-owned volume
        hf_home = next(e["value"] for c in head["containers"] for e in c.get("env", []) if e["name"] == "HF_HOME") \
            if doc["kind"] != "Pod" else "/shared/hf"
        for folder in (str(Path(out).parent), hf_home):  # --out's parent and HF_HOME: created and given to uid 1000
            assert f" {folder}" in script.split("&&")[0] and re.search(rf"chown (-R )?1000:100 [^&]*{folder}", script), \
                (name, folder, script)

# ------------------------------------------------------------------------------------ deployment agreement
def _containers(doc: dict) -> list[dict]:
    return [c for _, pod in cfgcheck.pod_specs(doc) for c in pod.get("containers", [])]


def test_image_ray_version_and_install_agree():
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert base == f"rayproject/ray:{RAY_VERSION}-py311-cpu"  # CUDA from torch's wheels only (tests/test_image.py)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", dockerfile, re.M)
    assert re.search(r"bash \S*scripts/install\.sh --gpu ", dockerfile, re.M)  # the script CI's wheel test runs
    assert "pip install" not in dockerfile  # everything goes through the script and the lock
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        doc = _load(name)[0]
        assert cfgcheck.cluster_spec(doc)["rayVersion"] == RAY_VERSION
        for c in _containers(doc):
            assert IMAGE.match(c["image"]), c["image"]
            assert "command" not in c and "args" not in c  # the operator starts Ray itself
    launcher = _load("aws-cluster.yaml")[0]
    assert IMAGE.match(launcher["docker"]["image"])
    for name in CONFIGS:
        assert "pip install" not in name.read_text(), name  # nothing installed at start: the image has it


def test_rayjob_entrypoint_volumes_and_retries():
    job = _job()
    spec = job["spec"]
    assert spec["submissionMode"] in cfgcheck.SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["manifoldgd", "distill"]
    assert argv[argv.index("--set") + 1] == "runtime.device=cuda"  # never drifts to CPU
    config = argv[argv.index("--config") + 1]
    assert "/" not in config and load_yaml(config)  # a packaged preset, not a file that must be put somewhere
    pvcs = {d["metadata"]["name"]: d["spec"]["accessModes"] for d in _load("kuberay-volumes.yaml")}
    for where, pod in cfgcheck.pod_specs(job):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m for c in pod["containers"] for m in c["volumeMounts"]}
        out_mount = next(m for path, m in mounts.items() if argv[argv.index("--out") + 1].startswith(path + "/"))
        data_mount = next(m for path, m in mounts.items() if argv[argv.index("--data") + 1].startswith(path + "/"))
        assert pvcs[claims[out_mount["name"]]] == ["ReadWriteMany"], where
        # the data claim can be filled (RWX, by the staging pod) and is mounted read-only by the Ray pods
        data_volume = next(v for v in pod["volumes"] if v["name"] == data_mount["name"])
        assert pvcs[claims[data_mount["name"]]] == ["ReadWriteMany"], where
        assert data_mount.get("readOnly") and data_volume["persistentVolumeClaim"].get("readOnly"), where
        if where.startswith("worker"):
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_launcher_has_resources_and_a_shared_filesystem():
    launcher = _load("aws-cluster.yaml")[0]
    assert all("resources" in t for t in launcher["available_node_types"].values())
    assert launcher["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1
    assert any(o.startswith("-v ") and o.endswith(":/shared") for o in launcher["docker"]["run_options"])
    assert any("mount -t nfs" in c for c in launcher["initialization_commands"])
    assert not launcher.get("setup_commands")


# ------------------------------------------------------------------------------------------------- the lock
def test_lock_is_the_projects_whole_dependency_closure():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import lock
    finally:
        sys.path.remove(str(REPO / "scripts"))
    for path, expected in lock.locks().items():  # lock-cpu.txt (with the dev extra) and lock-runtime.txt
        assert path.read_text() == expected, f"run `make lock` and commit {path.name}"
    expected = lock.locks()[lock.LOCK]
    pins = dict(line.split("==") for line in expected.splitlines() if "==" in line)
    assert pins["torch"] == "2.13.0" and pins["ray"] == RAY_VERSION
    gpu = (REPO / "requirements" / "lock-gpu.txt").read_text()
    assert "-r lock-runtime.txt" in gpu.splitlines()  # the image gets no test tools
    cupy = PYPROJECT["project"]["optional-dependencies"]["gpu"][0].split(">")[0]
    assert re.search(rf"^{cupy}==[\d.]+;", gpu, re.M), "the gpu extra's CuPy is pinned in the GPU lock"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\):.*\$\(LOCK\)", makefile, re.M) and "scripts/install.sh" in makefile


# ------------------------------------------------------------------------------ what --working-dir uploads
def _ray_package(src: Path, dest: Path) -> zipfile.ZipFile:
    """Zip `src` exactly as `ray job submit --working-dir src` would (Ray's own packaging code), honouring only
    .rayignore (include_gitignore=False: the worst case, e.g. RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1)."""
    from ray._private.runtime_env.packaging import create_package

    create_package(str(src), dest, include_gitignore=False)
    return zipfile.ZipFile(dest)


def test_rayignore_keeps_the_upload_small_and_complete(tmp_path):
    copy_ = tmp_path / "repo"
    shutil.copytree(REPO, copy_, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "out", "build"))
    # What a working checkout holds besides the code: every kind the upload must leave out ...
    junk = [".venv/lib/python3.11/site-packages/torch/lib/libtorch.so", ".git/objects/pack/pack-1.pack",
            "runs/demo/train/0/0_0000.png", "out/x/_work/latents/part-0.parquet", "models/DiT-XL-2-256/x.safetensors",
            "pipeline/priors/mnist10k/.ray_train/checkpoint_0/model.pt", "build/lib/pipeline/cli.py",
            "manifoldgd.egg-info/PKG-INFO", "pipeline/__pycache__/cli.cpython-311.pyc", "tests/test_x.py"]
    # ... and a package folder whose name a careless pattern would catch.
    keep = ["pipeline/models/__init__.py", "pipeline/presets/imagenet1k_ipc50.yaml", "pipeline/data/mnist10k.npz"]
    for rel in junk + keep:
        (copy_ / rel).parent.mkdir(parents=True, exist_ok=True)
        if not (copy_ / rel).exists():
            (copy_ / rel).write_bytes(os.urandom(1 << 20))
    names = set(_ray_package(copy_, tmp_path / "pkg.zip").namelist())
    assert not [rel for rel in junk if rel in names]
    assert all(rel in names for rel in keep)
    assert "pipeline/__init__.py" in names and "pipeline/__main__.py" in names and "ops/__init__.py" in names
    assert any(n.startswith("pipeline/priors/mnist10k/") for n in names)  # the built-in prior ships with the code

    # The repository itself, as it stands: far under Ray 2.60's cap (a zipped package of 512 MiB or more is refused).
    pkg = _ray_package(REPO, tmp_path / "repo.zip")
    size = (tmp_path / "repo.zip").stat().st_size
    unpacked = sum(i.file_size for i in pkg.infolist())
    assert size < 30 * 2**20 and unpacked < 50 * 2**20, (size, unpacked)
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE
    assert GCS_STORAGE_MAX_SIZE == 512 * 2**20  # the cap cluster_configs/README.md states
    assert not any(n.startswith((".git/", ".venv/", "runs/", "tests/")) for n in pkg.namelist())


# ------------------------------------------------------------- helpers for the environments without the repo
def _deps_only_venv(where: Path) -> Path:
    """A venv that sees this environment's dependencies (a .pth file naming its site-packages) but not the
    project: a .pth line is added to sys.path as a plain folder, so the editable install's finder hook in
    that folder is never run, and nothing named `pipeline` is importable."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    site = Path(subprocess.run([where / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_manifoldgd_deps.pth").write_text("".join(f"{p}\n" for p in paths))
    return where / "bin" / "python"


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", **extra)
    return env


def _copy_of_repo(dest: Path) -> Path:
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "out", "build", "*.egg-info",
                                                              "__pycache__", ".pytest_cache"))
    return dest


# --------------------------------------------------------- the RayJob entrypoint, from a wheel, outside the repo
@pytest.mark.slow
def test_rayjob_entrypoint_runs_from_a_wheel_install_outside_the_repo(tmp_path):
    src = _copy_of_repo(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheels"), str(src)], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("manifoldgd-*.whl")
    with zipfile.ZipFile(wheel) as whl:  # package data travels in the wheel
        assert "pipeline/presets/imagenet1k_ipc50.yaml" in whl.namelist()
    py = _deps_only_venv(tmp_path / "venv")
    env = _clean_env()
    probe = subprocess.run([py, "-c", "import pipeline"], cwd=tmp_path, env=env, capture_output=True)
    assert probe.returncode != 0, "the fresh venv must not see the project before the wheel is installed"
    # The same script, and the same project step, as the Dockerfile's (the lock step is the Makefile's here).
    subprocess.run(["bash", REPO / "scripts" / "install.sh", "--no-lock", "--python", py, wheel], check=True,
                   cwd=tmp_path, env=env)
    where = subprocess.run([py, "-c", "import pipeline; print(pipeline.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(tmp_path / "venv")), where

    argv = shlex.split(_job()["spec"]["entrypoint"])
    data = write_image_folder(tmp_path / "imagenet", {"n01440764": 3, "n02102040": 2}) / "train"
    argv[argv.index("--data") + 1] = str(data)  # the cluster's /data and /shared, here
    argv[argv.index("--out") + 1] = str(tmp_path / "shared" / "out")
    exe = Path(py).parent / argv[0]
    assert exe.is_file(), f"the entrypoint's {argv[0]} is not installed by the wheel"
    run = subprocess.run([exe, *argv[1:], "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "classes: 2; images: 5" in run.stdout
    assert f"{2 * 50} images into {tmp_path / 'shared' / 'out'}/train" in run.stdout  # IPC 50 from the preset


# -------------------------------------------------- `ray job submit --working-dir` to a cluster without manifoldgd




@pytest.mark.cluster
@pytest.mark.slow
def test_job_submit_with_working_dir_to_a_cluster_without_the_package(tmp_path, tiny_prior):
    import ray

    ray.shutdown()  # cluster tests run last; the session's private instance is not needed any more
    py = _deps_only_venv(tmp_path / "venv")
    env = _clean_env(PATH=f"{py.parent}{os.pathsep}{os.environ['PATH']}")
    assert subprocess.run([py, "-c", "import pipeline"], cwd=tmp_path, env=env, capture_output=True).returncode != 0
    ray_cli = [str(py), "-m", "ray.scripts.scripts"]
    work = _copy_of_repo(tmp_path / "checkout")  # what a user has: a checkout, submitted with --working-dir
    data = write_image_folder(tmp_path / "data", {"a": 3, "b": 3})
    out = tmp_path / "out"
    port, dash = free_port(), free_port()
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    # `ray start --block` in its own process group: stopping it ends this cluster only (`ray stop` would end
    # every Ray on the machine, other users' and tests' included).
    head = subprocess.Popen([*ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", *ports,
                             "--include-dashboard=true", f"--dashboard-port={dash}", "--disable-usage-stats",
                             f"--temp-dir={tempfile.mkdtemp(prefix='raynopkg', dir='/tmp')}"],
                            env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    common = ["--ipc", "2", "--model", str(tiny_prior), "--vae", "", "--set", "sampler.num_steps=4",
              "--set", "sampler.t_stop=2", "--set", "tangent.neighbours=3", "--set", "tangent.dim=2",
              "--set", "runtime.progress=false"]
    entry = (f"python -m pipeline distill --dry-run --data {data} --out {out} && "
             f"python -m pipeline distill --data {data} --out {out} {shlex.join(common)}")
    try:
        wait_for_dashboard(dash, head)
        for _ in range(20):  # the job agent comes up some seconds after the dashboard
            job = subprocess.run([*ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                                  "--working-dir", str(work), "--", "sh", "-c", entry],
                                 env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stderr:
                break
            time.sleep(2)
    finally:
        stop_process_group(head)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout.lower()
    assert "classes: 2; images: 6" in job.stdout  # the dry run's listing
    assert sorted(p.name for p in (out / "train" / "a").glob("*.png")) == ["a_0000.png", "a_0001.png"]
