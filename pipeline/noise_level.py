"""Noise-level estimates on uint8 images, numpy and PyWavelets only (no torch, no scikit-image):
they run in the CPU decode stage, whose worker processes should not pay torch's import time and
memory, nor scikit-image's (0.55 s per process, for one function)."""

from __future__ import annotations

import numpy as np

from pipeline.batch import ok_rows, pixels_of

MAD_TO_SIGMA = 0.6744897501960817  # scipy.stats.norm.ppf(0.75): MAD of a unit Gaussian


def estimate_sigma(img: np.ndarray, crop: int = 512) -> float:
    """Noise sigma (0–255 units) of a uint8 image, centre crop: the wavelet MAD estimate of
    Donoho & Johnstone (1994), as ``skimage.restoration.estimate_sigma(channel_axis=-1,
    average_sigmas=True)`` computes it (db2 diagonal detail, zero coefficients masked, channels
    averaged; a test pins the two together). A channel whose detail is all zero counts 0
    (scikit-image: NaN).

    Textured clean images read a few units high; it is a report and a guide, not the model's
    input (the model runs blind unless ``--sigma`` is given).
    """
    import pywt

    h, w = img.shape[:2]
    if h < 8 or w < 8:
        return 0.0
    y, x = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
    c = img[y : y + crop, x : x + crop].astype(np.float32)
    planes = [c] if c.ndim == 2 else [c[..., ch] for ch in range(c.shape[2])]
    sigmas = []
    for plane in planes:
        d = pywt.dwtn(plane, "db2")["dd"]
        d = d[np.nonzero(d)]
        sigmas.append(float(np.median(np.abs(d))) / MAD_TO_SIGMA if d.size else 0.0)
    return float(np.mean(sigmas))


def estimate_sigma_pca(img: np.ndarray, patch: int = 7, crop: int = 384, stride: int = 3) -> float:
    """Noise sigma (0–255) from the smallest eigenvalue of the covariance of weakly textured
    patches (after Pyatykh et al., 2013), per channel, averaged.

    Unlike the wavelet estimate it stays near 0 on clean but textured photos, which makes it
    the right test for "is this image already clean?". It reads low at high noise (the
    flattest patches are picked partly for their low noise), so it is not used as the level.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    h, w = img.shape[:2]
    if h < 4 * patch or w < 4 * patch:
        return 0.0
    y, x = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
    c = img[y : y + crop, x : x + crop].astype(np.float32)
    out = []
    for ch in range(c.shape[2]):
        p = sliding_window_view(c[..., ch], (patch, patch))[::stride, ::stride].reshape(-1, patch * patch)
        p = p[(p.min(1) > 0) & (p.max(1) < 255)]  # clipped patches understate the noise
        if len(p) < 4 * patch * patch:
            continue
        var = p.var(1)
        est = None
        for q in (1.0, 0.5, 0.25, 0.1):  # flatter and flatter patches: texture stops inflating it
            sel = p[var <= np.quantile(var, q)]
            if len(sel) < 2 * patch * patch:
                break
            ev = np.linalg.eigvalsh(np.cov(sel, rowvar=False))
            est = float(np.sqrt(max(ev[0], 0.0)))
        if est is not None:
            out.append(est)
    return float(np.mean(out)) if out else 0.0


def estimate_noise_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CPU stage: the ``noise_sigma`` column (NaN for rows that are not decoded images)."""
    sig = np.full(len(batch["key"]), np.nan, dtype=np.float32)
    for i in ok_rows(batch):
        sig[i] = estimate_sigma(pixels_of(batch, i))
    batch["noise_sigma"] = sig
    return batch
