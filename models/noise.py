"""Synthetic degradations for training and benchmarks.

All noise is applied to images in [0, 1] and, like real image files, the result is clipped and
rounded to 8 bits. ``sigma`` values are in 0–255 units.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def quantize(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.clamp(0, 1) * 255) / 255


def add_awgn_uint8(img: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Additive white Gaussian noise on a uint8 HxWx3 image; clipped and rounded (benchmarks)."""
    rng = np.random.default_rng(seed)
    noisy = img.astype(np.float64) + rng.normal(0.0, sigma, img.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).float() / 255


def degrade(
    clean: torch.Tensor,
    gen: torch.Generator,
    sigma_max: float = 55.0,
    p_clean: float = 0.08,
    p_poisson: float = 0.15,
    p_jpeg: float = 0.12,
    p_known: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Degrade a batch (N,3,H,W) in [0,1]. Returns (noisy, sigma_cond).

    sigma_cond is the noise level handed to the network: the true sigma (jittered ±5%, so the
    model tolerates a slightly wrong user override) with probability ``p_known`` for Gaussian
    noise, else -1 (blind).
    """
    n = clean.shape[0]
    u = torch.rand(n, generator=gen)
    sigma = torch.rand(n, generator=gen) * sigma_max
    cond = torch.full((n,), -1.0)
    noisy = clean.clone()
    white = torch.randn(clean.shape, generator=gen)
    for i in range(n):
        if u[i] < p_clean:
            sigma[i] = 0.0
            if torch.rand(1, generator=gen) < p_known:
                cond[i] = 0.0
        elif u[i] < p_clean + p_poisson:
            # Poisson-Gaussian (shot + read noise): photons at white level log-uniform in [20, 1000].
            photons = float(torch.exp(torch.empty(1).uniform_(np.log(20), np.log(1000), generator=gen)))
            lam = clean[i] * photons
            shot = torch.poisson(lam, generator=gen) / photons
            read = float(torch.rand(1, generator=gen)) * 10 / 255
            noisy[i] = quantize(shot + read * white[i])
            continue
        elif u[i] < p_clean + p_poisson + p_jpeg:
            light = float(torch.rand(1, generator=gen)) * 10 / 255
            q = int(torch.randint(15, 91, (1,), generator=gen))
            noisy[i] = _jpeg(quantize(clean[i] + light * white[i]), q)
            continue
        elif torch.rand(1, generator=gen) < p_known:
            cond[i] = sigma[i] * float(torch.empty(1).uniform_(0.95, 1.05, generator=gen))
        noisy[i] = quantize(clean[i] + sigma[i] / 255 * white[i])
    return noisy, cond
