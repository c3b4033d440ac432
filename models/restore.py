"""``avif-restore-codec``: AV1 (AVIF through Pillow's libavif) codes the image, a learned
restoration filter decodes it better.

Why a hybrid: the end-to-end learned codecs trained here on 2 CPU cores (codec-ctx, ~2.5 h in
all) stay 38–54% behind AVIF in BD-rate and flatten near 33 dB, while what archives want is the
top end. AV1's transform coding is mature; what a small network adds cheaply is decoding: it
learns to undo AV1's ringing, blocking and 4:2:0 chroma loss from the decoded image itself
(as the neural post-filters of VVC/AV2 research do). The encoder then measures, per image and
per RGB channel, how much of the filter's correction to apply (least squares against the
original, quantized to 1/32 in 0..2, three bytes in the stream), so the decoded image is never
worse than AVIF's own (strength 0) and an image the filter suits gets more of it.

Quality rungs 1..N map to libavif qualities (``avif_qualities``); the filter is conditioned on
the rung (PostFilter's per-quality feature scales). Stream: the aejob header (model name,
checkpoint id, rung, size; latent shape (1, 1, 1): there is none), then the payload: 3 strength
bytes, then the AVIF file. The AV1 decode is normative (bit-exact); the filter is float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from models import avif, bitstream
from models.codec import PostFilter

NAME = "avif-restore-codec"
STRENGTH_STEP = 32  # strengths are k / 32
STRENGTH_MAX = 64  # k <= 64: at most twice the filter's correction
NO_LATENT = (1, 1, 1)  # header field: the AV1 payload has no latent tensor
TILE = 512  # the filter runs on tiles of this size (plus margins): bounded memory on big images
MARGIN = 16  # > the filter's receptive radius (2 * (layers - 1) px at layers <= 8)


@dataclass(frozen=True)
class RestoreCodecConfig:
    # libavif quality per rung, increasing: ~0.13-2.6 bpp on 768x512 crops of training photos
    avif_qualities: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80)
    default_quality: int = 5
    speed: int = avif.SPEED
    # Full chroma and libaom's PSNR tuning: -8.2% BD-rate (PSNR, 0.15-2.5 bpp) against
    # Pillow's defaults (4:2:0, libavif's default tuning) at the same speed, measured on six
    # 768x512 crops of training photos; 4:4:4 alone -2.3%, tune=psnr alone -2.6%.
    subsampling: str = "4:4:4"
    tune: str = "psnr"
    channels: int = 64  # restoration filter width (at half resolution: 2x2 blocks as 12 channels)
    layers: int = 8

    @property
    def num_qualities(self) -> int:
        return len(self.avif_qualities)

    def __post_init__(self) -> None:
        q = self.avif_qualities
        if not q or any(b <= a for a, b in zip(q, q[1:], strict=False)) or q[0] < 0 or q[-1] > 100:
            raise ValueError(f"avif_qualities must be increasing within 0..100: {q}")
        if not 1 <= self.default_quality <= len(q):
            raise ValueError(f"default_quality {self.default_quality} not in 1..{len(q)}")
        if not 2 <= self.layers <= 8 or self.channels < 1:
            raise ValueError("layers must be 2..8 and channels positive")


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 → (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.require(img, requirements=['C', 'W'])).permute(2, 0, 1)[None].float() / 255


class AvifRestoreCodec(nn.Module):
    stream_name = NAME
    encoder_device_modules = ("post",)  # what CodecEngine moves to a GPU (AV1 stays on the CPU)

    def __init__(self, config: RestoreCodecConfig = RestoreCodecConfig()) -> None:
        super().__init__()
        self.config = config
        self.post = PostFilter(config.channels, config.layers, config.num_qualities)

    def settings(self, threads: int | None = None) -> avif.AvifSettings:
        return avif.AvifSettings(speed=self.config.speed, subsampling=self.config.subsampling,
                                 threads=threads or max(1, torch.get_num_threads()), tune=self.config.tune)

    def forward(self, base: torch.Tensor, quality: torch.Tensor | int) -> torch.Tensor:
        """Training: AVIF-decoded (N, 3, H, W) in [0, 1] (even H, W) and rung indices 0..N-1
        (one per image, or one for all) → the filtered image (full strength)."""
        q = torch.as_tensor(quality, device=base.device).reshape(-1).expand(base.shape[0])
        return self.post(base, q)

    # ------------------------------------------------------------------ the coding interface
    def load_coding_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """No entropy tables: AV1 carries its own."""
        del tensors

    def analyse(self, img: np.ndarray) -> None:
        """Nothing is shared between rungs (each is its own AV1 encode)."""
        del img

    def _check_quality(self, quality: int) -> int:
        q = int(quality)
        if not 1 <= q <= self.config.num_qualities:
            raise ValueError(f"quality must be in 1..{self.config.num_qualities}, got {quality}")
        return q

    @torch.inference_mode()
    def correction(self, base: np.ndarray, quality: int) -> torch.Tensor:
        """The filter's full-strength correction of an AVIF-decoded image: (3, H, W) float in
        0..1 units, computed tile by tile (odd sizes replicate-padded to even)."""
        h, w = base.shape[:2]
        x = to_tensor(base)
        x = nn.functional.pad(x, (0, w % 2, 0, h % 2), mode="replicate") if h % 2 or w % 2 else x
        q = torch.tensor([quality - 1])
        out = torch.empty_like(x[0])
        hh, ww = x.shape[2], x.shape[3]
        for y0 in range(0, hh, TILE):
            for x0 in range(0, ww, TILE):
                y1, x1 = min(y0 + TILE, hh), min(x0 + TILE, ww)
                # margins keep the 2x2 phase (even offsets) and see past the tile's edges
                a, b = max(0, y0 - MARGIN), max(0, x0 - MARGIN)
                c, d = min(hh, y1 + MARGIN), min(ww, x1 + MARGIN)
                tile = x[:, :, a:c, b:d].contiguous(memory_format=torch.channels_last)
                r = self.post(tile, q) - tile
                out[:, y0:y1, x0:x1] = r[0, :, y0 - a : y1 - a, x0 - b : x1 - b]
        return out[:, :h, :w]

    @staticmethod
    def blend(base: np.ndarray, corr: torch.Tensor, strengths: tuple[int, int, int]) -> np.ndarray:
        k = torch.tensor(strengths, dtype=torch.float32)[:, None, None] / STRENGTH_STEP
        x = to_tensor(base)[0] + k * corr
        return torch.round(x.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()

    @staticmethod
    def fit_strengths(img: np.ndarray, base: np.ndarray, corr: torch.Tensor) -> tuple[int, int, int]:
        """Per RGB channel, the least-squares strength of ``corr`` against the original,
        quantized to 1/STRENGTH_STEP within 0..STRENGTH_MAX."""
        err = (to_tensor(img)[0] - to_tensor(base)[0]).double()
        c = corr.double()
        num = (c * err).sum(dim=(1, 2))
        den = (c * c).sum(dim=(1, 2)).clamp_min(1e-12)
        k = torch.round(num / den * STRENGTH_STEP).clamp(0, STRENGTH_MAX).to(torch.int64)
        return int(k[0]), int(k[1]), int(k[2])

    def compress(self, img: np.ndarray, quality: int, sha256: str = "", analysed: None = None) -> bytes:
        """AV1-encode ``img`` at rung ``quality``, decode it, fit the filter's strengths."""
        return self.compress_and_decode(img, quality, sha256, analysed)[0]

    @torch.inference_mode()
    def compress_and_decode(self, img: np.ndarray, quality: int, sha256: str = "",
                            analysed: None = None) -> tuple[bytes, np.ndarray]:
        """``compress``, and the image the stream decodes to: the encoder has already decoded the
        AV1 layer and run the filter on it, which is all ``decompress`` does (same base, same
        correction), so a caller that measures the decode need not run the filter twice."""
        del analysed
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or not img.size:
            raise ValueError(f"expected a uint8 HxWx3 image, got {img.dtype} {img.shape}")
        quality = self._check_quality(quality)
        settings = self.settings()
        data = avif.encode(img, self.config.avif_qualities[quality - 1], settings)
        base = avif.decode(data, settings)
        corr = self.correction(base, quality)
        strengths = self.fit_strengths(img, base, corr)
        header = bitstream.Header(
            model=self.stream_name, sha256_prefix=bitstream.Header.sha_prefix(sha256), quality=quality,
            width=img.shape[1], height=img.shape[0], pad_bottom=0, pad_right=0, latent_shape=NO_LATENT)
        decoded = self.blend(base, corr, strengths) if any(strengths) else base
        return bitstream.pack(header, bytes(strengths) + data), decoded

    def parse(self, data: bytes, sha256: str | None = None) -> tuple[bitstream.Header, tuple[int, int, int], bytes]:
        header, payload = bitstream.unpack_for(data, self.stream_name, self.config.num_qualities, sha256)
        if header.latent_shape != NO_LATENT or header.pad_bottom or header.pad_right or len(payload) < 4:
            raise bitstream.BitstreamError("inconsistent header for an AVIF payload")
        k = tuple(payload[:3])
        if max(k) > STRENGTH_MAX:
            raise bitstream.BitstreamError(f"filter strengths {k} out of range")
        return header, (k[0], k[1], k[2]), payload[3:]

    @torch.inference_mode()
    def decompress(self, data: bytes, sha256: str | None = None) -> np.ndarray:
        header, strengths, payload = self.parse(data, sha256)
        try:
            base = avif.decode(payload, self.settings())
        except Exception as e:  # Pillow raises OSError/ValueError/SyntaxError on bad files
            raise bitstream.BitstreamError(f"corrupted AVIF payload: {type(e).__name__}: {e}") from e
        if base.shape[:2] != (header.height, header.width):
            raise bitstream.BitstreamError(
                f"AVIF payload is {base.shape[1]}x{base.shape[0]}, header says {header.width}x{header.height}")
        if not any(strengths):
            return base
        return self.blend(base, self.correction(base, header.quality), strengths)


def register_all(register: Any, entry_cls: Any) -> None:
    register(
        entry_cls(
            name=NAME,
            kind="codec",
            config_cls=RestoreCodecConfig,
            factory=AvifRestoreCodec,
            presets={
                "tiny": {"channels": 8, "layers": 2},
                "base": {},
            },
        )
    )
