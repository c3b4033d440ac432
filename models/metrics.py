"""Image quality metrics shared by training, jobs and benchmarks."""

from __future__ import annotations

import math

import numpy as np

PSNR_IDENTICAL = 99.0  # what identical images score (finite, so JSON stays plain)


def psnr_uint8(a: np.ndarray, b: np.ndarray, identical: float = PSNR_IDENTICAL) -> float:
    """PSNR in dB of two uint8 images (peak 255); ``identical`` when they are equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return identical if mse == 0 else min(identical, 10 * math.log10(255.0**2 / mse))
