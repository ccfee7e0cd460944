"""Where the images come from: an ImageFolder, a parquet of (image bytes, label) or a built-in dataset.

Listing is cheap and runs in the driver before Ray starts (``--dry-run`` stops here). Files that cannot be
images at all (hidden files, other extensions, broken or looping links) are rejected at listing time with a
reason; files that fail to decode are caught later, in the decode stage. Both end in quarantine.parquet.

Labels are untrusted: each class's label (folder name, parquet ``label`` value) is turned into its output
folder name by ``pipeline.common.names.folder_name`` here, once, and the listing is keyed by that folder
name from then on (``Listing.source_labels`` keeps the original). A dataset with two labels that differ
only in case or Unicode normalisation is refused here (exit 2, one line naming both); a parquet row with a
null label becomes a quarantine row.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.common.names import LabelCollisionError, folder_name, folder_names
from pipeline.config import ConfigError, DataConfig
from pipeline.inputs import datasets

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
WNID = re.compile(r"^n\d{8}$")


@dataclass
class Listing:
    kind: str                                   # imagefolder | parquet | builtin
    root: str
    classes: list[str]                          # output folder names (names.folder_name of each label)
    labels: dict[str, int]                      # folder name -> label id fed to the model
    files: list[tuple[str, str]] = field(default_factory=list)     # (relative path, folder name)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    num_rows: int = 0                           # parquet / built-in: rows instead of files
    source_labels: dict[str, str] = field(default_factory=dict)   # folder name -> original label

    def source_label(self, folder: str) -> str:
        return self.source_labels.get(folder, folder)

    def renamed(self) -> list[tuple[str, str]]:
        """(original label, folder name) of the classes whose folder is not their label."""
        return [(self.source_label(c), c) for c in self.classes if self.source_label(c) != c]

    @property
    def num_items(self) -> int:
        return len(self.files) if self.kind == "imagefolder" else self.num_rows

    @property
    def parquet_paths(self) -> list[str]:
        """parquet: the input files (``files`` holds (file, "") rows)."""
        return [f for f, _ in self.files] if self.kind == "parquet" else []

    def empty_classes(self) -> list[str]:
        if self.kind != "imagefolder":
            return []
        seen = {c for _, c in self.files}
        return [c for c in self.classes if c not in seen]


def imagenet_wnids() -> list[str]:
    text = resources.files("pipeline").joinpath("data/imagenet1k.txt").read_text()
    return text.split()


def label_ids(classes: list[str], class_map: str = "") -> dict[str, int]:
    """ImageNet wnids -> their 1K index; a class-map file if given; else sorted folder order.
    ``classes`` and the keys returned are the original labels (folder names on disk, parquet values)."""
    if class_map:
        try:
            lines = Path(class_map).read_text().splitlines()
        except OSError as exc:
            raise ConfigError("data.class_map", f"cannot read {class_map}: {exc.strerror}") from None
        mapping = {}
        for number, line in enumerate(lines, 1):
            if line.strip() and not line.startswith("#"):
                name, _, idx = line.rstrip().rpartition(" ")
                try:
                    mapping[name.strip() or idx] = int(idx)
                except ValueError:
                    raise ConfigError("data.class_map", f"{class_map} line {number}: expected '<label> <id>' "
                                      f"with an integer id, got {line.strip()!r}") from None
        missing = [c for c in classes if c not in mapping]
        if missing:
            raise ConfigError("data.class_map", f"no label for classes {missing[:5]}")
        return {c: mapping[c] for c in classes}
    if classes and all(WNID.match(c) for c in classes):
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        if all(c in index for c in classes):
            return {c: index[c] for c in classes}
    return {c: i for i, c in enumerate(sorted(classes))}


def keyed_by_folder(kind: str, root: str, classes: list[str], ids: dict[str, int], **kw) -> Listing:
    """A Listing of the original labels ``classes`` (with label ids ``ids``), keyed by their folder names.
    Refuses (ConfigError on data.path) labels that differ only in case or Unicode normalisation."""
    try:
        folders = folder_names(classes)
    except LabelCollisionError as exc:
        raise ConfigError("data.path", f"{root}: {exc}") from None
    return Listing(kind, root, [folders[c] for c in classes], {folders[c]: int(ids[c]) for c in classes},
                   source_labels={folders[c]: c for c in classes}, **kw)


def _reject_reason(path: Path) -> str | None:
    if path.name.startswith("."):
        return "hidden file"
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:
            return "symlink loop"
        except OSError:
            return "broken symlink"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file extension ({path.suffix or 'none'})"
    return None


SHIPPED_CLASS_LISTS = ("imagenette", "imagewoof", "imagenet100", "imagenet1k")


def class_subset(spec: str) -> list[str]:
    """Class folder names from a shipped list name or a file (one per line)."""
    if spec in SHIPPED_CLASS_LISTS:
        return resources.files("pipeline").joinpath(f"data/{spec}.txt").read_text().split()
    try:
        return Path(spec).read_text().split()
    except OSError as exc:
        raise ConfigError("data.classes", f"cannot read {spec}: {exc.strerror} "
                          f"(or name a shipped list: {', '.join(SHIPPED_CLASS_LISTS)})") from None


def _chosen_classes(found: list[str], subset: str, where: str) -> list[str]:
    """The class folders to use: all found, or the ``data.classes`` subset (every listed one must exist)."""
    classes = found
    if subset:
        wanted = class_subset(subset)
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise ConfigError("data.classes", f"{len(missing)} listed classes are not in {where}: {missing[:3]}")
        classes = sorted(wanted)
    if not classes:
        raise ConfigError("data.path", f"{where} holds no class folders (expected <class>/<image> files)")
    return classes


def list_imagefolder(root: Path, split: str, class_map: str = "", subset: str = "") -> Listing:
    base = root / split if (root / split).is_dir() else root
    found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = _chosen_classes(found, subset, str(base))
    listing = keyed_by_folder("imagefolder", str(base), classes, label_ids(classes, class_map))
    for cls in classes:
        folder = folder_name(cls)
        # os.walk without following directory links: a link loop cannot hang the listing
        for dirpath, dirnames, filenames in os.walk(base / cls, followlinks=False):
            dirnames.sort()
            for name in list(dirnames):
                full = Path(dirpath) / name
                if full.is_symlink():
                    listing.rejected.append((str(full.relative_to(base)), "symlinked directory not followed"))
            for name in sorted(filenames):
                full = Path(dirpath) / name
                rel = str(full.relative_to(base))
                reason = _reject_reason(full)
                if reason:
                    listing.rejected.append((rel, reason))
                else:
                    listing.files.append((rel, folder))
    return listing


REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def list_remote_imagefolder(uri: str, split: str, class_map: str = "", subset: str = "") -> Listing:
    """An ImageFolder in object storage (``s3://bucket/prefix``, ``gs://...``), listed through pyarrow's
    filesystems (credentials and endpoint as pyarrow and Ray Data read them: AWS_* variables, e.g.
    AWS_ENDPOINT_URL for an S3-compatible store). Same layout, labels and rejection rules as a local one;
    ``root`` stays the URI, and files are (path relative to it, class)."""
    try:
        fs, path = pafs.FileSystem.from_uri(uri.rstrip("/"))
        if fs.get_file_info(f"{path}/{split}").type == pafs.FileType.Directory:
            uri, path = f"{uri.rstrip('/')}/{split}", f"{path}/{split}"
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except (OSError, ValueError) as exc:
        raise ConfigError("data.path", f"cannot list {uri}: {exc}") from None
    files = sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)
    found = sorted({f.split("/", 1)[0] for f in files if "/" in f and not f.startswith(".")})
    classes = _chosen_classes(found, subset, uri)
    listing = keyed_by_folder("imagefolder", uri.rstrip("/"), classes, label_ids(classes, class_map))
    keep = set(classes)
    for rel in files:
        cls = rel.split("/", 1)[0]
        if cls not in keep or "/" not in rel:
            continue
        name = rel.rsplit("/", 1)[-1]
        suffix = Path(name).suffix.lower()
        if name.startswith("."):
            listing.rejected.append((rel, "hidden file"))
        elif suffix not in IMAGE_EXTENSIONS:
            listing.rejected.append((rel, f"not an image file extension ({suffix or 'none'})"))
        else:
            listing.files.append((rel, folder_name(cls)))
    return listing


def parquet_files(spec: str) -> list[str]:
    """The parquet files of ``spec``: one file, a folder (every ``*.parquet`` below it) or a glob pattern."""
    if any(ch in spec for ch in "*?["):
        return sorted(str(Path(p)) for p in glob.glob(os.path.expanduser(spec), recursive=True)
                      if p.endswith(".parquet"))
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*.parquet") if not p.name.startswith("."))
    return [str(path)] if path.is_file() and path.suffix == ".parquet" else []


def parquet_label(value) -> str:
    """A parquet ``label`` value as the class's label string (integers as their digits)."""
    return str(value)


def null_label_row(file: str, row: int) -> str:
    """The quarantine path of a parquet row: ``FILE#row N`` (N counts from 0 within the file)."""
    return f"{file}#row {row}"


def list_parquet(spec: str, files: list[str], class_map: str = "") -> Listing:
    """Rows (image bytes, label) of one or many parquet files; labels from the column (integers are the
    model's label ids unless ``class_map`` is given; other labels take sorted order or ``class_map``).
    A row whose label is null is not used: it is a quarantine row (``FILE#row N``, "null label")."""
    labels, rejected = [], []
    for f in files:
        schema = pq.read_schema(f)
        if "image" not in schema.names or "label" not in schema.names:
            raise ConfigError("data.path", f"{f} needs columns 'image' (bytes) and 'label'; has {schema.names}")
        column = pq.read_table(f, columns=["label"]).column("label").to_pylist()
        rejected += [(null_label_row(f, i), "null label") for i, v in enumerate(column) if v is None]
        labels += [v for v in column if v is not None]
    if not labels:
        raise ConfigError("data.path", f"{spec} holds no rows with a label")
    classes = sorted({parquet_label(v) for v in labels}, key=lambda c: (len(c), c) if c.isdigit() else (0, c))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels) and not class_map:
        mapping = {parquet_label(v): int(v) for v in set(labels)}
    else:
        mapping = label_ids(classes, class_map)
    return keyed_by_folder("parquet", spec, classes, mapping, files=[(f, "") for f in files],
                           rejected=rejected, num_rows=len(labels))


def list_builtin(name: str) -> Listing:
    _, labels, class_names = datasets.load_builtin(name, split="train")
    classes = list(class_names)
    return keyed_by_folder("builtin", name, classes, {c: i for i, c in enumerate(classes)}, num_rows=len(labels))


def builtin_names() -> tuple[str, ...]:
    return tuple(datasets.builtin_names())


def _has_image_folders(path: Path) -> bool:
    """A folder of class sub-folders (ImageFolder) rather than a folder of parquet files."""
    return any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())


def list_source(data: DataConfig) -> Listing:
    """List a dataset; raise ConfigError('data.path', ...) when it is missing or malformed."""
    if data.path in builtin_names():
        return list_builtin(data.path)
    if is_remote(data.path):
        return list_remote_imagefolder(data.path, data.split, data.class_map, data.classes)
    path = Path(data.path).expanduser()
    files = parquet_files(data.path)
    if files and (path.is_file() or not path.exists() or not _has_image_folders(path)):
        return list_parquet(data.path, files, data.class_map)
    if not path.exists():
        known = ", ".join(builtin_names()) or "none"
        raise ConfigError("data.path", f"{data.path} does not exist (and is not a built-in dataset: {known})")
    if path.is_file():
        raise ConfigError("data.path", f"{path} is a file but not a .parquet")
    return list_imagefolder(path, data.split, data.class_map, data.classes)
