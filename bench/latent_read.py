"""Stage 2's latent read: row-by-row Python lists (before) vs the flat value buffer (now), one class.

    python bench/latent_read.py [--rows 1300 --dim 4096]

Writes one class of random latents as parquet (float lists, as Ray Data writes them), reads it back both
ways in the same run and prints the times and their ratio; the two results must be identical.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/ itself, whose ops.py would shadow the ops package

from pipeline.distill.plan import latent_matrix  # noqa: E402


def best_of(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1300)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    x = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
    path = Path(tempfile.mkdtemp()) / "class.parquet"
    pq.write_table(pa.table({"latent": pa.array(list(x), type=pa.large_list(pa.float32()))}), path)
    column = pq.read_table(path).column("latent")
    t_old, old = best_of(lambda: np.stack([np.asarray(v, dtype=np.float32) for v in column.to_pylist()]),
                         args.repeats)
    t_new, new = best_of(lambda: latent_matrix(column), args.repeats)
    assert np.array_equal(old, new) and np.array_equal(new, x)
    print(f"{args.rows} x {args.dim} latents: to_pylist {t_old:.3f} s, flat buffer {t_new:.4f} s, "
          f"ratio {t_old / t_new:.0f}x (best of {args.repeats}, same values)")


if __name__ == "__main__":
    main()
