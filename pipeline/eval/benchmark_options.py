"""The options of one `manifoldgd benchmark` command, typed: what the benchmark's functions take."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchmarkOptions:
    data: str
    test: str | None = None             # test data (None: --data's test split)
    out: str = "runs/benchmark"
    ipc: str = "1,10,50"                # comma-separated IPCs
    seeds: str = "3"                    # see parse_seeds
    methods: str = "all"
    model: str | None = None            # None: not given (a built-in dataset brings its prior)
    vae: str | None = None
    set: tuple[str, ...] = ()           # distill settings for every generative method
    variant: tuple[str, ...] = ()       # NAME=BASE:KEY=VALUE[,KEY=VALUE]
    report_only: bool = False
    results_file: str | None = None
    into: tuple[str, ...] = ()
    copies: bool = True
    copies_max_train: int = 50_000
    share_latents: bool = True
    arch: str = "convnet"
    profile: str = "paper"
    fast_steps: int = 500
    student: tuple[str, ...] = ()
    workers: int = 0
    features: str = "auto"
    labels: str = "hard"                # hard | soft (a teacher relabels every augmented batch)
    teacher: str = "auto"               # with labels soft: see pipeline/eval/teachers.py
    soft_temperature: float = 20.0      # with labels soft: teachers.DEFAULT_TEMPERATURE

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> BenchmarkOptions:
        """The parsed command line's options (the only place the argparse namespace is read)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        for name in ("set", "variant", "into", "student"):
            values[name] = tuple(values[name] or ())
        return cls(**values)

    def command_line(self) -> str:
        """The command that reproduces (and resumes) this benchmark, with every default spelled out."""
        parts = ["manifoldgd benchmark", f"--data {self.data}", f"--out {self.out}", f"--ipc {self.ipc}",
                 f"--seeds {self.seeds}", f"--methods {shlex.quote(self.methods)}", f"--arch {self.arch}",
                 f"--profile {self.profile}", f"--features {self.features}"]
        parts += [f"--fast-steps {self.fast_steps}"] if self.profile == "fast" else []
        parts += [f"--test {self.test}"] if self.test else []
        parts += [f"--model {self.model}"] if self.model is not None else []
        parts += [f"--vae '{self.vae}'"] if self.vae is not None else []
        parts += [f"--set {s}" for s in self.set] + [f"--student {s}" for s in self.student]
        parts += [f"--variant {v}" for v in self.variant]
        if self.labels != "hard":  # a hard-label command reads as it did before the flag existed
            parts += [f"--labels {self.labels}", f"--teacher {self.teacher}",
                      f"--soft-temperature {self.soft_temperature:g}"]
        return " ".join(parts)


def parse_seeds(spec) -> list[int]:
    """``--seeds``: ``N`` = seeds 0..N-1; ``A-B`` = seeds A..B (inclusive); ``A,B,C`` = those seeds (a list
    may mix single seeds and ranges: ``0,3-5``). The way to select a subset, e.g. tuning seeds disjoint
    from the table's."""
    text = str(spec).strip()
    if text.isdigit():
        return list(range(int(text)))
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            a, sep, b = part.partition("-")
            seeds += list(range(int(a), int(b) + 1)) if sep else [int(a)]
    except ValueError:
        raise ValueError(f"--seeds {spec!r}: expected N (seeds 0..N-1), A-B or a comma-separated list") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {spec!r}: expected distinct seeds >= 0")
    return seeds



