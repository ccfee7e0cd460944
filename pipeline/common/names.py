"""Class names as path components: the one function every label passes through before it names a folder.

A class's label (a parquet ``label`` value, an ImageFolder folder name, a name in ``data.class_map``) becomes
``DIR/train/<folder>/<folder>_<k>.png`` and a few files under ``DIR/_work``. Labels are untrusted input, so
``folder_name`` maps any string to a folder name that is safe on every filesystem the outputs may land on:

- a label that is already safe is kept as it is: only ``A-Z a-z 0-9 . _ -``, not starting with ``.`` or
  ``_``, at most ``MAX_FOLDER_BYTES`` long (ImageNet wnids, digits, ``golden_retriever`` keep their bytes);
- any other label is percent-encoded (RFC 3986 style, upper-case hex, over the label's UTF-8 bytes): every
  byte outside that set, ``%`` itself and a leading ``.`` or ``_`` become ``%XX`` (``a/b`` -> ``a%2Fb``,
  ``..`` -> ``%2E.``, ``chat noir`` -> ``chat%20noir``); ``label_of`` gives the label back. (A leading
  ``.`` would hide the folder; a leading ``_`` is how this project names its own files, ``_SUCCESS``,
  ``_work``, and what readers of the output skip.)
- a label whose encoding is longer than ``MAX_FOLDER_BYTES`` (or the empty label) is cut to the encoding
  of its first characters, followed by ``~`` and 16 hex digits of the label's SHA-256 (over its UTF-8). Such a name is not
  reversible on its own: the run records every class's original label (``DIR/classes.json``, the
  manifest's ``source_label`` column).

The result is never empty, ``.`` or ``..``, never starts with ``.`` or ``_``, holds no ``/`` or NUL, is ASCII (so
NFC), and is at most ``MAX_FOLDER_BYTES`` bytes: with ``_<k>.png`` and the writer's temp-file affixes it
stays under Linux's 255-byte file-name limit. The mapping is injective: two distinct labels never share a
folder (a short form never holds ``~``; two long forms differ in their hash).

Labels that differ only in case or Unicode normalisation (``Cat`` / ``cat``, ``é`` composed / decomposed)
would share a folder on a case-insensitive or normalising filesystem (macOS, Windows shares) and name the
same class to a reader: ``check_distinct`` rejects such a set at listing, naming both labels.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

# 200 bytes + "_<k:05d>.png" (11) + the atomic writer's ".<name>.<8 random>.tmp" (14) <= 255.
MAX_FOLDER_BYTES = 200
HASH_HEX = 16
SAFE = re.compile(r"[A-Za-z0-9._-]+")
_TOKEN = re.compile(r"%[0-9A-F]{2}|.", re.DOTALL)


class LabelCollisionError(ValueError):
    """Two labels of one dataset that differ only in case or Unicode normalisation."""


def is_safe(label: str) -> bool:
    """A label kept as its own folder name."""
    return (SAFE.fullmatch(label) is not None and not label.startswith((".", "_"))
            and len(label) <= MAX_FOLDER_BYTES)


def _quoted_chars(label: str) -> list[str]:
    """Each character of ``label`` as it appears in its folder name: itself, or its UTF-8 bytes as %XX."""
    out = []
    for i, ch in enumerate(label):
        if ch.isascii() and SAFE.fullmatch(ch) and not (i == 0 and ch in "._"):
            out.append(ch)
        else:
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
    return out


def folder_name(label: str) -> str:
    """The folder (and file-name stem) of a class whose label is ``label``; see the module docstring."""
    if not isinstance(label, str):
        raise TypeError(f"a label must be a string, got {type(label).__name__}")
    if is_safe(label):
        return label
    pieces = _quoted_chars(label)
    quoted = "".join(pieces)
    if quoted and len(quoted) <= MAX_FOLDER_BYTES:
        return quoted
    digest = hashlib.sha256(label.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_HEX]
    budget, prefix = MAX_FOLDER_BYTES - 1 - HASH_HEX, ""
    for piece in pieces:  # whole characters only
        if len(prefix) + len(piece) > budget:
            break
        prefix += piece
    return prefix + "~" + digest


def label_of(folder: str) -> str | None:
    """The label a folder name came from, or None for a hashed (cut) name: look it up in classes.json."""
    if "~" in folder:
        return None
    data = bytearray()
    for token in _TOKEN.findall(folder):
        data.extend(bytes.fromhex(token[1:]) if len(token) == 3 else token.encode())
    return data.decode("utf-8", "surrogatepass")


def collision_key(label: str) -> str:
    """What a case-insensitive, normalising reader sees: NFKC, then case-folded (then NFKC again, since
    case folding can leave a string unnormalised)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", label).casefold())


def check_distinct(labels: Iterable[str]) -> None:
    """Raise LabelCollisionError naming the first two labels that differ only in case or normalisation."""
    seen: dict[str, str] = {}
    for label in labels:
        key = collision_key(label)
        other = seen.setdefault(key, label)
        if other != label:
            raise LabelCollisionError(
                f"labels {other!r} and {label!r} differ only in case or Unicode normalisation; they would "
                "share a folder on a case-insensitive filesystem: rename one")


def folder_names(labels: Iterable[str]) -> dict[str, str]:
    """label -> folder for a dataset's labels, after ``check_distinct``."""
    labels = list(dict.fromkeys(labels))
    check_distinct(labels)
    return {label: folder_name(label) for label in labels}
