"""The CPU stages' functions on dict batches that a job composes before and after its model actors.

They live apart from the jobs' modules and from the engines on purpose: Ray imports a stage
function's module in every CPU worker process, and this one imports no torch (importing it
costs each worker about 1.5 s of CPU and ~200 MB; on a 2-core machine that was most of a short
job's fixed cost).
"""

from __future__ import annotations

import numpy as np

from pipeline import decode
from pipeline.batch import normalize
from pipeline.noise_level import estimate_noise_batch

Batch = dict[str, np.ndarray]


def clean_prepare(batch: Batch, options: decode.DecodeOptions) -> Batch:
    """``aejob clean``: decode + validate, then estimate each image's noise level."""
    return estimate_noise_batch(normalize(decode.decode_batch(normalize(batch), options)))


def compress_prepare(batch: Batch, options: decode.DecodeOptions, keep_source: bool) -> Batch:
    """``aejob compress``: decode + validate; with ``keep_source`` the source bytes ride along
    (``--keep-if-smaller`` stores them when they beat the codec's stream)."""
    batch = normalize(batch)
    src = batch["data"].copy() if keep_source else None
    out = normalize(decode.decode_batch(batch, options))
    if src is not None:
        out["source_data"] = src
    return out


def passthrough(batch: Batch) -> Batch:
    return normalize(batch)
