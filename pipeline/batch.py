"""Helpers for numpy dict batches as Ray Data hands them between stages.

Between stages Ray stores blocks as Arrow: a column that is None on every row of a block comes
back as a float array of NaN, and strings may come back as numpy ``str_``. ``normalize`` turns
every non-numeric column back into an object array with ``None`` for missing values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NUMERIC = {"unit_items", "source_bytes", "skipped_members", "width", "height", "noise_sigma",
           "bpp", "psnr", "quality", "size"}  # quality: compress's rung, float in flight (NaN: none)


def objects(values: Sequence[object] | np.ndarray) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def normalize(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, col in batch.items():
        if name in NUMERIC:
            out[name] = col
        elif col.dtype != object:
            if col.dtype.kind == "f":
                out[name] = objects([None] * len(col)) if np.all(np.isnan(col)) else objects(list(col))
            elif col.ndim > 1:  # a tensor column (embeddings): one array per row
                out[name] = objects(list(col))
            else:
                out[name] = objects([v.item() if isinstance(v, np.generic) else v for v in col])
        else:
            out[name] = objects([None if _missing(v) else v for v in col])
    return out


def pixels_of(batch: dict[str, np.ndarray], i: int) -> np.ndarray:
    h, w = int(batch["height"][i]), int(batch["width"][i])
    return np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(h, w, 3)


def ok_rows(batch: dict[str, np.ndarray]) -> list[int]:
    return [
        i for i in range(len(batch["key"]))
        if batch["status"][i] == "ok" and batch["kind"][i] == "item" and batch["pixels"][i] is not None
    ]
