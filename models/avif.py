"""AVIF through Pillow's own plugin (libavif: aom encodes, dav1d decodes in the wheels), with
settings pinned in one dataclass: the base layer of ``avif-restore-codec`` and the AVIF curve of
``aejob bench codec`` use the same calls. Torch-free."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, features

SPEED = 6  # libavif's speed 0 (slowest, best) .. 10; 6 is Pillow's default
SUBSAMPLING = "4:2:0"  # Pillow's default for RGB
SPEEDS = range(0, 11)  # libavif's speed 0 (slowest, fewest bits) .. 10
TUNE = ""  # libaom's tuning: "" keeps libavif's default; "psnr" optimises for PSNR (advanced option)
_decode_lock = threading.Lock()  # the decoder's thread count is a module global in Pillow


class AvifUnavailable(RuntimeError):
    """This Pillow was built without AVIF."""


def available() -> bool:
    return bool(features.check("avif"))


def require() -> None:
    if not available():
        raise AvifUnavailable("this Pillow has no AVIF support (PIL.features.check('avif') is False); "
                              "install a Pillow wheel >= 11.3, which bundles libavif")


@dataclass(frozen=True)
class AvifSettings:
    """libavif settings through Pillow, pinned for a whole run and recorded beside its results."""

    speed: int = SPEED
    subsampling: str = SUBSAMPLING
    threads: int = 2  # max_threads of the encoder and of the decoder
    tune: str = TUNE

    def describe(self, qualities: Sequence[int]) -> dict[str, Any]:
        from PIL import AvifImagePlugin, _avif  # type: ignore[attr-defined]

        return {"pillow": Image.__version__, "libavif": features.version("avif"),
                "codecs": _avif.codec_versions(), "encoder_codec": "auto", "decoder_codec":
                AvifImagePlugin.DECODE_CODEC_CHOICE, "speed": self.speed, "subsampling": self.subsampling,
                "range": "full", "max_threads": self.threads, "tune": self.tune or "libavif default",
                "qualities": list(qualities)}


@contextmanager
def decode_threads(threads: int) -> Iterator[None]:
    """Pillow's AVIF decoder takes its thread count from a module setting."""
    from PIL import AvifImagePlugin

    with _decode_lock:
        old = AvifImagePlugin.DEFAULT_MAX_THREADS
        AvifImagePlugin.DEFAULT_MAX_THREADS = threads
        try:
            yield
        finally:
            AvifImagePlugin.DEFAULT_MAX_THREADS = old


def check_speed(speed: int) -> int:
    """``speed`` as an int, or ValueError when libavif has no such speed."""
    if int(speed) not in SPEEDS:
        raise ValueError(f"libavif speed takes {SPEEDS[0]}..{SPEEDS[-1]}, got {speed}")
    return int(speed)


def encode(img: np.ndarray, quality: int, settings: AvifSettings | None = None) -> bytes:
    """uint8 HxWx3 RGB → AVIF bytes at libavif ``quality`` (0..100)."""
    s = settings or AvifSettings()
    buf = io.BytesIO()
    extra: dict[str, Any] = {"advanced": [("tune", s.tune)]} if s.tune else {}
    Image.fromarray(img).save(buf, format="AVIF", quality=int(quality), speed=s.speed,
                              subsampling=s.subsampling, max_threads=s.threads, **extra)
    return buf.getvalue()


def decode(data: bytes, settings: AvifSettings | None = None) -> np.ndarray:
    """AVIF bytes → uint8 HxWx3 RGB."""
    with decode_threads((settings or AvifSettings()).threads), Image.open(io.BytesIO(data)) as im:
        if im.format != "AVIF":
            raise ValueError(f"not an AVIF image: {im.format}")
        return np.asarray(im.convert("RGB")).copy()
