"""The documents describe this repository: the method document maps every knob that changes output bytes to
its symbol with the config's own default, and no document points outside the repository or at a machine."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import DistillConfig

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
# Fields that are inputs or outputs of a run, not knobs of the method (documented in README's option table).
NOT_KNOBS = {"data.path", "data.split", "data.class_map", "data.classes", "out", "model.revision"}
NOT_YET_CHECKED: set[str] = set()


def _fields(obj, prefix: str = "") -> dict[str, object]:
    """Dotted config key -> default, for every leaf field of the config."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_fields(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def _knob_rows() -> dict[str, str]:
    """Rows of method.md's knob table (key, symbol, default): config key -> the default column as written."""
    text = METHOD.read_text()
    section = text[text.index("## 7."):text.index("## 8.")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0].count("`") == 2:
            rows[cells[0].strip("`")] = cells[2]
    return rows


def test_every_knob_that_changes_bytes_is_in_the_method_document():
    hashed = {k: v for k, v in _fields(DistillConfig()).items()
              if not k.startswith("runtime.") and k not in NOT_KNOBS}
    text = METHOD.read_text()
    missing = [k for k in hashed if f"`{k}`" not in text]
    assert not missing, f"docs/method.md does not mention {missing}"


def test_the_knob_table_states_the_configs_defaults():
    defaults = _fields(DistillConfig())
    rows = _knob_rows()
    assert len(rows) >= 25, sorted(rows)
    for key, written in rows.items():
        assert key in defaults, f"docs/method.md lists {key}, which the config does not have"
        assert yaml.safe_load(written) == defaults[key], f"{key}: docs/method.md says {written}, config {defaults[key]!r}"


def _documents() -> list[Path]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [p for p in docs if str(p.relative_to(ROOT)) not in NOT_YET_CHECKED]


@pytest.mark.parametrize("path", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_cite_nothing_outside_the_repository_and_no_machine_path(path):
    text = path.read_text()
    assert "METHOD.md" not in text
    assert not re.search(r"\bissue \d+", text, re.IGNORECASE), "issue numbers point outside the repository"
    assert not re.search(r"(?<![\w.])/(work|home)/", text), "a path of the machine a figure was made on"


def test_code_cites_the_method_document_not_an_outside_one():
    offenders = [str(p.relative_to(ROOT)) for folder in ("pipeline", "ops", "bench", "tests")
                 for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml") and p.name != "test_docs.py"
                 and "METHOD.md" in p.read_text()]
    assert not offenders
    sections = {int(m) for m in re.findall(r"docs/method\.md section (\d)", "\n".join(
        p.read_text() for folder in ("pipeline", "ops") for p in (ROOT / folder).rglob("*.py")))}
    headings = {int(m) for m in re.findall(r"^## (\d)\. ", METHOD.read_text(), re.MULTILINE)}
    assert sections and sections <= headings, f"code cites sections {sorted(sections - headings)} that do not exist"
