"""Residual U-Net denoising autoencoder.

Most of the work happens at low resolution: the input is pixel-unshuffled by 2 (as FFDNet does),
so the first level already runs at H/2 and each level halves again. The network predicts the
noise (residual learning) and returns ``noisy - noise``.

Noise conditioning: two extra input planes ``[sigma/255, known]``. ``known=0`` is blind mode (the
default at inference); ``known=1`` lets a user override the noise level (``--sigma N``). Training
mixes both, so one checkpoint serves both modes.

The encoder's bottleneck, average-pooled and L2-normalised, is the image embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DenoiserConfig:
    channels: tuple[int, ...] = (48, 96, 192)  # per level, level 0 at H/2
    blocks: tuple[int, ...] = (1, 2, 2)  # residual blocks per encoder level (last = bottleneck)
    unshuffle: int = 2

    @property
    def multiple(self) -> int:
        """Inputs are padded to a multiple of this (the total downsampling factor)."""
        return self.unshuffle * 2 ** (len(self.channels) - 1)

    @property
    def embedding_dim(self) -> int:
        return self.channels[-1]


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x), inplace=True))


class ResUNetDenoiser(nn.Module):
    def __init__(self, config: DenoiserConfig = DenoiserConfig()) -> None:
        super().__init__()
        self.config = config
        ch, r = config.channels, config.unshuffle
        self.head = nn.Conv2d(3 * r * r + 2, ch[0], 3, padding=1)
        self.enc = nn.ModuleList(
            nn.Sequential(*[ResBlock(c) for c in [ch[i]] * config.blocks[i]])
            for i in range(len(ch))
        )
        self.down = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 2, stride=2) for i in range(len(ch) - 1))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in range(len(ch) - 1)
        )
        self.dec = nn.ModuleList(
            nn.Sequential(*[ResBlock(ch[i]) for _ in range(max(1, config.blocks[i]))])
            for i in range(len(ch) - 1)
        )
        self.tail = nn.Conv2d(ch[0], 3 * r * r, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # start as the identity: do no harm from step 0
        nn.init.zeros_(self.tail.bias)  # type: ignore[arg-type]

    def _cond(self, x: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
        """Per-image [sigma/255, known] planes at the unshuffled resolution."""
        n, _, h, w = x.shape
        if sigma is None:
            s = x.new_zeros(n)
            known = x.new_zeros(n)
        else:
            s = sigma.to(x.dtype).reshape(n) / 255.0
            known = (sigma.reshape(n) >= 0).to(x.dtype)
            s = s.clamp(min=0)
        return torch.stack([s, known], 1)[:, :, None, None].expand(n, 2, h, w)

    def features(
        self, x: torch.Tensor, sigma: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N,3,H,W) in [0,1], H and W multiples of ``config.multiple``.

        sigma: (N,) noise level in 0–255 units, negative for unknown (blind); None = all blind.
        Returns (denoised, bottleneck features).
        """
        r = self.config.unshuffle
        z = F.pixel_unshuffle(x, r)
        h = self.head(torch.cat([z, self._cond(z, sigma)], 1))
        skips = []
        for i, enc in enumerate(self.enc):
            h = enc(h)
            if i < len(self.down):
                skips.append(h)
                h = self.down[i](h)
        bottleneck = h
        for i in reversed(range(len(self.up))):
            h = self.dec[i](self.up[i](h) + skips[i])
        noise = F.pixel_shuffle(self.tail(h), r)
        return x - noise, bottleneck

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder only (blind): the latent the embedding is pooled from."""
        z = F.pixel_unshuffle(x, self.config.unshuffle)
        h = self.head(torch.cat([z, self._cond(z, None)], 1))
        for i, enc in enumerate(self.enc):
            h = enc(h)
            if i < len(self.down):
                h = self.down[i](h)
        return h

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        return self.features(x, sigma)[0]

    @staticmethod
    def embed(bottleneck: torch.Tensor) -> torch.Tensor:
        """Global average pool of the bottleneck, L2-normalised: a fixed-length embedding."""
        v = bottleneck.float().mean(dim=(2, 3))
        return F.normalize(v, dim=1)


def macs_per_pixel(model: ResUNetDenoiser) -> float:
    """Multiply-adds per input pixel, counted from the conv layers."""
    total = 0.0
    r = model.config.unshuffle
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            k = m.kernel_size[0] * m.kernel_size[1]
            per_pos = m.in_channels * m.out_channels * k / m.groups
            if name.startswith(("head", "tail")):
                scale = 1 / r**2
            else:
                level = _level_of(name)
                scale = 1 / (r**2 * 4**level)
            if isinstance(m, nn.ConvTranspose2d):
                per_pos = m.in_channels * m.out_channels  # k outputs per input position
                scale = 1 / (r**2 * 4 ** (level + 1))
                per_pos *= k
            elif isinstance(m, nn.Conv2d) and m.stride[0] == 2:
                scale = 1 / (r**2 * 4 ** (level + 1))
            total += per_pos * scale
    return total


def _level_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
