"""Encode stage: cleaned pixels back to image bytes (PNG, WebP or JPEG) before the write.

EXIF from the input (orientation reset, GPS removed by the decode stage) is embedded in the
output. ``quality`` applies to WebP and JPEG; PNG is lossless (quality is ignored).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.batch import normalize

FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
EXTENSIONS = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}
DEFAULT_QUALITY = {"png": 0, "webp": 90, "jpeg": 92}


@dataclass(frozen=True)
class EncodeOptions:
    format: str = "png"
    quality: int | None = None

    def resolved_quality(self) -> int:
        return DEFAULT_QUALITY[self.format] if self.quality is None else int(self.quality)


def encode_image(pixels: np.ndarray, options: EncodeOptions, exif: bytes | None = None) -> bytes:
    if options.format not in FORMATS:
        raise ValueError(f"unknown format {options.format!r}; use one of {', '.join(FORMATS)}")
    img = Image.fromarray(pixels, "RGB")
    kwargs: dict[str, object] = {}
    if exif:
        kwargs["exif"] = exif
    q = options.resolved_quality()
    if options.format == "png":
        kwargs["compress_level"] = 6
    elif options.format == "webp":
        kwargs.update(quality=q, method=4)
    else:
        # 4:4:4 at high quality: chroma subsampling would undo part of the cleaning
        kwargs.update(quality=q, subsampling=0 if q >= 90 else 2, optimize=True)
    buf = io.BytesIO()
    img.save(buf, format=FORMATS[options.format], **kwargs)
    return buf.getvalue()


def encode_batch(batch: dict[str, np.ndarray], options: EncodeOptions) -> dict[str, np.ndarray]:
    """Ray Data UDF: replaces ``pixels`` by ``image`` bytes; failures become error rows."""
    batch = normalize(batch)
    n = len(batch["key"])
    images = np.empty(n, dtype=object)
    status = batch["status"].copy()
    error = batch["error"].copy()
    fmt = np.empty(n, dtype=object)
    for i in range(n):
        px = batch["pixels"][i]
        if status[i] != "ok" or px is None or batch["kind"][i] != "item":
            continue
        try:
            h, w = int(batch["height"][i]), int(batch["width"][i])
            arr = np.frombuffer(px, dtype=np.uint8).reshape(h, w, 3)
            exif = batch["exif"][i] if "exif" in batch else None
            images[i] = encode_image(arr, options, exif)
            fmt[i] = options.format
        except Exception as e:  # an encoder failure is this row's error, not the job's
            status[i], error[i] = "error", f"encode failed: {type(e).__name__}: {e}"
    out = {k: v for k, v in batch.items() if k not in ("pixels", "exif")}
    out.update(image=images, image_format=fmt, status=status, error=error)
    return out
