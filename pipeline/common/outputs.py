"""The output folder: its layout, atomic writes, and the guard against mixing two configs in one folder.

DIR/train/<class>/<class>_<k:04d>.png   written as temp file + rename: a PNG is complete or absent
DIR/train/<class>/_SUCCESS              written last, after the class's images and manifest part
DIR/manifest.parquet, quarantine.parquet, run.json, classes.json
DIR/_work/                              resumable intermediate state (config, latents, centroids, parts)

<class> is a folder name made by ``pipeline.common.names.folder_name`` from the class's label. Every path
built from a class name goes through ``OutputDir.child``, which refuses (``UnsafePathError``) a name that
is not one path component, and any path that resolves outside the output folder: nothing is ever written
outside ``--out``, whatever a label says.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.common.names import MAX_FOLDER_BYTES
from pipeline.config import ConfigError, DistillConfig

WORK = "_work"
SUCCESS = "_SUCCESS"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_table(path: Path, table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class UnsafePathError(ValueError):
    """A path built from a class name that would leave the output folder (or is not one component)."""


def check_component(name: str) -> str:
    """``name`` when it is one safe path component (what ``names.folder_name`` makes), else UnsafePathError."""
    if (not isinstance(name, str) or not name or name in (".", "..") or name.startswith((".", "_"))
            or "/" in name or "\0" in name or len(name.encode("utf-8", "surrogatepass")) > MAX_FOLDER_BYTES):
        raise UnsafePathError(f"refusing class folder name {name!r}: not one path component of at most "
                              f"{MAX_FOLDER_BYTES} bytes without a leading '.' or '_'")
    return name


class OutputDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.work = self.root / WORK
        self.train = self.root / "train"

    def child(self, *parts: str) -> Path:
        """``root / parts...``, refused (UnsafePathError) when it resolves outside the output folder."""
        path = self.root.joinpath(*parts)
        root = self.root.resolve()
        resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            raise UnsafePathError(f"refusing to write {path}: it resolves outside the output folder {root}")
        return path

    def class_dir(self, class_name: str) -> Path:
        return self.child("train", check_component(class_name))

    def image_path(self, class_name: str, k: int) -> Path:
        return self.child("train", check_component(class_name), f"{class_name}_{k:04d}.png")

    def is_class_done(self, class_name: str) -> bool:
        return (self.class_dir(class_name) / SUCCESS).exists() and self.manifest_part(class_name).exists()

    def manifest_part(self, class_name: str) -> Path:
        return self.child(WORK, "manifest", f"{check_component(class_name)}.parquet")

    def centroid_file(self, class_name: str) -> Path:
        return self.child(WORK, "centroids", f"{check_component(class_name)}.npz")

    @property
    def latents(self) -> Path:
        return self.work / "latents"

    def prepare(self, cfg: DistillConfig, overwrite: bool) -> None:
        """Create the folder, check it is writable, and refuse one made by a different config."""
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            probe = self.work / ".write-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError("out", f"output folder {self.root} is not writable: {exc.strerror}") from None
        digest = cfg.config_hash()
        if self.check_config(cfg, overwrite):
            self.clear()
            self.work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.work / "config.json", {"config_hash": digest, "config": cfg.hashed_dict()})

    def check_writable(self) -> None:
        """What ``prepare`` would refuse, found without writing: the nearest existing folder on the way to
        the output folder must be a folder this process may write (``--dry-run`` calls it)."""
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError("out", f"output folder {self.root} is not writable: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError("out", f"output folder {self.root} is not writable: {existing} is read-only here")

    def check_config(self, cfg: DistillConfig, overwrite: bool) -> bool:
        """True when the folder was made by another config and ``overwrite`` allows clearing it; ConfigError
        when it was and ``overwrite`` is off. Reads only (``--dry-run`` calls it too)."""
        digest = cfg.config_hash()
        previous = self._stamped_other("config.json", "config_hash", digest) if self.work.is_dir() else None
        if previous is not None and not overwrite:
            raise ConfigError(
                "out", f"{self.root} was made by a different config (hash {previous}, now {digest}); "
                "choose another --out or pass --overwrite")
        return previous is not None

    def _stamped_other(self, name: str, key: str, value: str) -> str | None:
        """The ``key`` of the stamp ``_work/<name>`` when it exists and differs from ``value``, else None."""
        stamp = self.work / name
        previous = json.loads(stamp.read_text()).get(key) if stamp.exists() else value
        return None if previous == value else previous

    def check_device(self, cfg: DistillConfig, kind: str, overwrite: bool) -> None:
        """Refuse to resume a folder whose images were made on another kind of device (``cuda`` or ``cpu``,
        what the stages request: ``runtime.device``, or ``auto`` and the cluster's GPUs). The kind is not in
        the config hash, but it changes bytes (``model.dtype=auto`` is bf16 on CUDA, fp32 on CPU, and the
        kernels differ), so a resume on the other kind would mix two runs' bytes in one folder."""
        previous = self._stamped_other("device.json", "device", kind)
        if previous is not None:
            if not overwrite:
                raise ConfigError(
                    "runtime.device", f"{self.root} was made on {previous} and this run would use {kind} "
                    f"(model.dtype {cfg.model.dtype}): resuming would mix the bytes of two devices. Resume "
                    f"with --set runtime.device={previous}, or choose another --out, or pass --overwrite")
            self.clear()
            self.prepare(cfg, overwrite=False)
        self.stamp_device(kind)

    def stamp_device(self, kind: str) -> None:
        """Record the kind of device the folder's bytes come from (``check_device`` compares against it)."""
        atomic_write_json(self.work / "device.json", {"device": kind})

    def clear(self) -> None:
        """Remove what this project writes, and nothing else the user may keep beside it."""
        for name in ("train", WORK):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for name in ("manifest.parquet", "quarantine.parquet", "run.json", "classes.json", "contact_sheet.png"):
            (self.root / name).unlink(missing_ok=True)
