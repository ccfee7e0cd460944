"""No silent CPU fallback: a worker given a GPU that torch (or CuPy) cannot use fails under runtime.device=cuda
with one line (stage, node, what torch reports, the driver it needs), warns once under auto, and run.json
records per stage the device each worker used. The GPUs here are Ray's logical GPUs (``ray.init(num_gpus=1)``):
Ray hands out the id, and torch, a CPU build on a machine without a GPU, cannot use it, which is the case to
catch."""
from __future__ import annotations

import json
import warnings

import pytest

from pipeline.common import device as dev
from pipeline.common.device import DeviceUnavailableError, cupy_device, device_error_line, summarize, torch_device


@pytest.fixture
def given_gpu(monkeypatch):
    """This process looks like a Ray worker on node 10.0.0.7 that Ray gave GPU 0."""
    monkeypatch.setattr(dev, "ray_worker", lambda: ("10.0.0.7", "f00d" * 8, ("0",)))
    monkeypatch.setattr(dev, "_warned", set())
    monkeypatch.delenv(dev.LOGICAL_GPUS_ENV, raising=False)


@pytest.fixture
def old_driver(monkeypatch):
    """torch built for CUDA 13 on a node whose driver is 550 (CUDA 12.4): what torch says, as it says it."""
    import torch

    def is_available():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 12040). "
                      "Please update your GPU driver by downloading and installing a new version.\nmore text",
                      UserWarning, stacklevel=2)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(dev, "nvidia_driver", lambda: "550.54.14")


def test_cuda_with_a_gpu_torch_cannot_use_fails_with_one_line(given_gpu, old_driver):
    with pytest.raises(DeviceUnavailableError) as err:
        torch_device("sample", "cuda")
    line = str(err.value)
    assert "\n" not in line
    for needle in ("sample:", "GPU(s) 0", "node 10.0.0.7", "torch.cuda.is_available() = False",
                   "driver on your system is too old (found version 12040)", "CUDA 13.0 build",
                   f">= {dev.MIN_DRIVER[13]}", "550.54.14", "runtime.device=cpu"):
        assert needle in line, (needle, line)


def test_auto_with_a_gpu_torch_cannot_use_warns_once_and_runs_on_cpu(given_gpu, old_driver, capsys):
    first = torch_device("encode", "auto")
    second = torch_device("encode", "auto")
    assert first.device == second.device == "cpu" and not first.on_gpu
    assert first.gpu_ids == ("0",) and "too old" in first.fallback and "node 10.0.0.7" in first.fallback
    printed = [ln for ln in capsys.readouterr().out.splitlines() if "warning:" in ln]
    assert len(printed) == 1 and "encode:" in printed[0] and "running on CPU" in printed[0], printed
    record = first.record()
    assert record["gpu_ids"] == ["0"] and record["requested"] == "auto" and json.dumps(record)


def test_no_gpu_given_is_no_fallback(monkeypatch, capsys):
    monkeypatch.setattr(dev, "ray_worker", lambda: ("10.0.0.7", "n1", ()))
    for requested in ("auto", "cpu"):
        d = torch_device("sample", requested)
        assert d.device == "cpu" and d.fallback == ""
    assert "warning" not in capsys.readouterr().out
    with pytest.raises(DeviceUnavailableError, match="runtime.device=cuda asked for a GPU"):
        torch_device("sample", "cuda")  # asked for one explicitly (in-process use): still no silent CPU


def test_logical_gpus_switch_turns_the_error_into_the_warning(given_gpu, old_driver, monkeypatch, capsys):
    monkeypatch.setenv(dev.LOGICAL_GPUS_ENV, "1")
    d = torch_device("sample", "cuda")
    assert d.device == "cpu" and d.fallback and dev.LOGICAL_GPUS_ENV in capsys.readouterr().out


def test_driver_requirement_and_driver_version(tmp_path, monkeypatch):
    monkeypatch.setattr(dev, "nvidia_driver", lambda: "")
    assert "CPU-only build" in dev.driver_requirement(None)
    assert ">= 580.65.06" in dev.driver_requirement("13.0") and "no NVIDIA driver" in dev.driver_requirement("13.0")
    assert ">= 525.60.13" in dev.driver_requirement("12.8")
    monkeypatch.undo()
    for text, version in (
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\nGCC version: 12",
         "550.54.14"),
        ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder)", "580.65.06"),
    ):
        f = tmp_path / "version"
        f.write_text(text)
        monkeypatch.setattr(dev, "DRIVER_FILE", str(f))
        assert dev.nvidia_driver() == version
    monkeypatch.setattr(dev, "DRIVER_FILE", str(tmp_path / "missing"))
    assert dev.nvidia_driver() == ""


def test_plan_tasks_check_cupy_only_where_auto_could_fall_back(given_gpu, monkeypatch, capsys):
    import ops.backend as backend

    monkeypatch.setattr(backend, "cupy_problem", lambda: "CuPy is not installed (pip install 'manifoldgd[gpu]')")
    with pytest.raises(DeviceUnavailableError) as err:
        cupy_device("plan", "cuda", "auto")
    assert "plan:" in str(err.value) and "CuPy is not installed" in str(err.value) and "node 10.0.0.7" in str(err.value)
    d = cupy_device("plan", "auto", "auto")
    assert d.device == "cpu" and "CuPy" in d.fallback and "warning: plan:" in capsys.readouterr().out
    chosen = cupy_device("plan", "cuda", "numpy")  # numpy is a choice, not a fallback
    assert chosen.device == "cpu" and chosen.fallback == ""
    monkeypatch.setattr(dev, "ray_worker", lambda: ("10.0.0.7", "n1", ()))  # gpus_per_plan_task=0: CPUs by design
    assert cupy_device("plan", "cuda", "auto").fallback == ""


def test_device_error_line_finds_the_line_however_ray_wrapped_it():
    line = "sample: Ray gave this worker GPU(s) 0 on node 10.0.0.7, but torch cannot use it: ..."
    try:
        try:
            raise DeviceUnavailableError(line)
        except DeviceUnavailableError as inner:
            raise RuntimeError("actor died") from inner
    except RuntimeError as outer:
        assert device_error_line(outer) == line
    wrapped = RuntimeError(f"ray::ClassSampler.__init__() (pid=1)\n  File x\nDeviceUnavailableError: {line}\n\nmore")
    assert device_error_line(wrapped) == line
    assert device_error_line(RuntimeError("something else")) == ""


def test_summarize_keeps_one_record_per_worker():
    a = {"node": "n", "node_id": "i", "pid": 1, "device": "cpu", "stage": "plan"}
    b = dict(a, pid=2)
    assert summarize([a, dict(a), None, b]) == [a, b]


# ------------------------------------------------------------------------- through Ray, logical GPU
def _distill_args(data, out, prior, device):
    return ["distill", "--data", str(data), "--out", str(out), "--ipc", "2", "--model", str(prior), "--vae", "",
            "--set", "sampler.num_steps=4", "--set", "sampler.t_stop=2", "--set", "tangent.neighbours=3",
            "--set", "tangent.dim=2", "--set", "runtime.progress=false", "--set", f"runtime.device={device}"]


@pytest.mark.cluster
@pytest.mark.slow
def test_logical_gpu_run_records_devices_per_stage_and_cuda_fails_with_one_line(tmp_path, tiny_prior, capsys):
    import ray
    from conftest import write_image_folder

    from pipeline.cli import main

    ray.shutdown()  # the session's instance has no GPU; cluster tests run last
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             object_store_memory=200 * 1024 * 1024, logging_level="ERROR", log_to_driver=False)
    try:
        data = write_image_folder(tmp_path / "data", {"a": 4, "b": 4})
        assert main(_distill_args(data, tmp_path / "auto", tiny_prior, "auto")) == 0
        run = json.loads((tmp_path / "auto" / "run.json").read_text())
        for stage in ("encode", "plan", "sample"):
            records = run["devices"][stage]
            assert records, (stage, run["devices"])
            for r in records:  # given the logical GPU, ran on CPU, said why
                assert r["gpu_ids"] == ["0"] and r["device"] == "cpu" and r["requested"] == "auto", (stage, r)
                assert f"{stage}: Ray gave this worker GPU(s) 0" in r["fallback"], (stage, r)
        printed = capsys.readouterr().out
        assert "warning: sample:" in printed  # the driver's summary line
        # the folder says where its bytes came from, not what was asked: a resume that would use the
        # (logical) GPU is refused rather than mixing two devices' bytes
        assert json.loads((tmp_path / "auto" / "_work" / "device.json").read_text()) == {"device": "cpu"}
        assert "asked for cuda but its workers ran on cpu" in printed
        assert main(_distill_args(data, tmp_path / "auto", tiny_prior, "cuda")) == 2
        assert "was made on cpu and this run would use cuda" in capsys.readouterr().err

        capsys.readouterr()
        assert main(_distill_args(data, tmp_path / "cuda", tiny_prior, "cuda")) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("manifoldgd: ")]  # not Ray's
        assert len(err) == 1 and err[0].startswith("manifoldgd: error: encode: Ray gave this worker GPU(s) 0"), err
        assert "torch.cuda.is_available() = False" in err[0] and "NVIDIA driver" in err[0], err
    finally:
        ray.shutdown()


@pytest.mark.cluster
@pytest.mark.slow
def test_cuda_plan_tasks_and_sampling_actors_fail_on_a_gpu_they_cannot_use(tmp_path):
    import ray
    from conftest import save_tiny_prior, stage_setup

    from pipeline.distill.plan import submit_plans
    from pipeline.distill.schedule import sample_stage

    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             object_store_memory=200 * 1024 * 1024, logging_level="ERROR", log_to_driver=False)
    try:
        prior = save_tiny_prior(tmp_path / "prior", num_classes=4)
        cfg, out = stage_setup(tmp_path / "run", prior, ["a", "b"], ipc=2, max_batch=2)
        cfg.runtime.device = "cuda"
        with pytest.raises(DeviceUnavailableError) as err:
            sample_stage(cfg, ["a", "b"], {"a": 0, "b": 1}, out)
        line = device_error_line(err.value)
        assert line.startswith("sample: Ray gave this worker GPU(s) 0 on node ") and "torch" in line, line
        assert not any(out.is_class_done(c) for c in "ab")
        refs = submit_plans(cfg, ["c"], out)  # no latents needed: the check comes first
        with pytest.raises(DeviceUnavailableError) as err:
            ray.get(list(refs))
        line = device_error_line(err.value)
        assert line.startswith("plan: Ray gave this worker GPU(s) 0 on node ") and "CuPy" in line, line
    finally:
        ray.shutdown()


def test_used_device_kind_is_what_the_torch_stages_really_ran_on(tmp_path):
    from pipeline.common.outputs import OutputDir
    from pipeline.distill.records import restamp_device, used_device_kind

    def rec(device):
        return {"device": device}

    assert used_device_kind({"encode": [], "plan": [rec("cpu")], "sample": []}) is None  # plans alone: no torch
    assert used_device_kind({"encode": [rec("cuda:0")], "sample": [rec("cuda:1")]}) == "cuda"
    assert used_device_kind({"encode": [rec("cpu")], "sample": [rec("cpu")]}) == "cpu"
    assert used_device_kind({"encode": [rec("cuda:0")], "sample": [rec("cpu")]}) == "mixed"
    out = OutputDir(str(tmp_path / "out"))
    out.work.mkdir(parents=True)
    out.stamp_device("cuda")
    assert restamp_device(out, "cuda", {"sample": [rec("cuda:0")]}) == "cuda"
    assert json.loads((out.work / "device.json").read_text()) == {"device": "cuda"}
    assert restamp_device(out, "cuda", {"sample": [rec("cpu")]}) == "cpu"  # fell back: stamped as it ran
    assert json.loads((out.work / "device.json").read_text()) == {"device": "cpu"}
