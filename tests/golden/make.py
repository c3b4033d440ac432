"""Writes the golden archives of the shipped codecs: one stream per codec (a fixed 64x48 test
image at the codec's default quality) and the image it decoded to when it was made. Run once
when a codec ships (``python -m tests.golden.make NAME...``); an existing golden is never
rewritten, since the point is that archives made by a released codec decode the same forever."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent


def golden_image() -> np.ndarray:
    from tests.conftest import make_image

    return make_image(64, 48, seed=7, noise=6)


def make(name: str) -> None:
    from models.codec import CodecEngine

    stream, png = HERE / f"{name}.bin", HERE / f"{name}.png"
    if stream.exists():
        print(f"{stream} exists: kept")
        return
    engine = CodecEngine(name, threads=1)
    data = engine.compress(golden_image())
    stream.write_bytes(data)
    Image.fromarray(engine.decompress(data)).save(png)
    print(f"{name}: {len(data)} bytes at quality {engine.default_quality}")


if __name__ == "__main__":
    for n in sys.argv[1:]:
        make(n)
