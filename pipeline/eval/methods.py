"""The benchmark's methods: the real baselines, the generative methods (each a distill config), their
groups (`main`, `ladder`, `all`), and the `--variant` knob sweeps built on top of them."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    kind: str                       # real | distill
    guidance: str = ""              # distill's --guidance
    cluster: str = ""               # distill's --cluster
    sets: tuple[str, ...] = field(default_factory=tuple)  # distill settings (key=value), as --set


METHODS = {m.name: m for m in (
    Method("random", "Random real", "real"),
    Method("kmeans_real", "Real nearest k-means centroids", "real"),
    Method("dit", "DiT (no guidance)", "distill", "none", "divisive"),
    # Each method pins the knobs that tell it from the other methods of its guidance mode, so a built-in
    # prior's tuned section for that mode (which holds its val winner's settings) cannot turn one into another.
    Method("mgd3", "MGD3 (mode + k-means)", "distill", "mode", "kmeans", ("sampler.trust_region=0",)),
    Method("divisive", "mode + divisive (branching 1)", "distill", "mode", "divisive",
           ("cluster.branching=1", "sampler.trust_region=0")),
    Method("levelwise", "mode + divisive level-wise", "distill", "mode", "divisive", ("sampler.trust_region=0",)),
    Method("manifold", "manifold + level-wise, no annealing", "distill", "manifold", "divisive",
           ("tangent.max_multiplier=1", "sampler.project_min_signal=0")),
    Method("manifoldgd", "ManifoldGD", "distill", "manifold", "divisive", ("sampler.project_min_signal=0",)),
    # Beyond the paper (docs/method.md section 7): the public code's variant and two new guidance options.
    Method("public", "public-code variant (mode term + unit pull)", "distill", "public", "divisive"),
    Method("noiseaware", "ManifoldGD, projected only at low noise", "distill", "manifold", "divisive",
           ("sampler.project_min_signal=0.1",)),
    Method("repel", "MGD3 + within-class repulsion", "distill", "mode", "kmeans", ("sampler.repulsion=0.3",)),
    Method("trust", "MGD3 + trust region", "distill", "mode", "kmeans", ("sampler.trust_region=1.0",)),
)}
MAIN = ("random", "kmeans_real", "dit", "mgd3", "manifoldgd")
# docs/method.md section 6: k-means -> divisive -> divisive level-wise -> + manifold guidance -> + radius annealing
LADDER = (("k-means", "mgd3"), ("divisive", "divisive"), ("divisive level-wise", "levelwise"),
          ("+ manifold guidance", "manifold"), ("+ radius annealing (= ManifoldGD)", "manifoldgd"))
OPTIONS = ("public", "noiseaware", "repel", "trust")
ALIASES = {"ladder": [m for _, m in LADDER], "main": list(MAIN), "options": list(OPTIONS), "all": list(METHODS)}


def parse_variants(items: list[str]) -> dict[str, Method]:
    """``NAME=BASE:key=value,key=value`` -> a generative method like BASE with extra distill settings: a
    knob sweep in the same folder, with the same students and seeds as the baselines."""
    out = {}
    for item in items:
        name, sep, rest = item.partition("=")
        base, sep2, sets = rest.partition(":")
        if not (sep and sep2 and name.isidentifier()) or base not in METHODS or METHODS[base].kind != "distill":
            raise ValueError(f"--variant {item!r}: expected NAME=BASE:key=value[,key=value] with BASE one of "
                             f"{', '.join(n for n, m in METHODS.items() if m.kind == 'distill')}")
        if name in METHODS:
            raise ValueError(f"--variant {item!r}: {name} is a built-in method name")
        extra = tuple(x.strip() for x in sets.split(",") if x.strip())
        b = METHODS[base]
        out[name] = Method(name, f"{b.label} [{', '.join(extra)}]", "distill", b.guidance, b.cluster, b.sets + extra)
    return out


def parse_methods(spec: str, table: dict[str, Method] | None = None) -> list[str]:
    """``--methods`` (names and groups, comma-separated) -> method names in order, each once; every
    variant in ``table`` runs too."""
    table = table or METHODS
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        names = ALIASES.get(item, [item])
        for n in names:
            if n not in table:
                raise ValueError(f"unknown method {n!r}; methods: {', '.join(METHODS)}; groups: {', '.join(ALIASES)}")
            if n not in out:
                out.append(n)
    if "kmeans_real" in out and "mgd3" not in out:
        out.append("mgd3")  # its k-means centroids come from the MGD3 run's plan
    out += [n for n in table if n not in METHODS and n not in out]  # every variant given runs
    return out
