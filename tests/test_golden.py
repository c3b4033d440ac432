"""Archives made by every shipped codec keep decoding: the golden streams in tests/golden/
(written by tests/golden/make.py when each codec shipped) must decode to the image they decoded
to then. The entropy decoding is integer and exact; the synthesis transforms and filters run in
float32, whose last bit may round differently on another CPU or torch build, so a pixel may be
off by one there (on the machine that made them the decode is identical)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import bitstream, checkpoint
from models.codec import CodecEngine
from models.metrics import psnr_uint8
from tests.golden.make import golden_image

GOLDEN = Path(__file__).parent / "golden"
STREAMS = sorted(GOLDEN.glob("*.bin"))


def test_every_shipped_codec_has_a_golden_archive() -> None:
    shipped = {p.stem for p in checkpoint.shipped_sidecars()
               if checkpoint.read_meta(p.with_suffix(".safetensors")).get("kind") == "codec"}
    assert shipped and shipped <= {p.stem for p in STREAMS}


@pytest.mark.parametrize("stream", STREAMS, ids=[p.stem for p in STREAMS])
def test_golden_archive_decodes_as_when_it_was_made(stream: Path) -> None:
    data = stream.read_bytes()
    header, _ = bitstream.unpack(data)
    engine = CodecEngine(stream.stem, threads=1)
    assert header.sha256_prefix == bitstream.Header.sha_prefix(engine.sha256)  # the same release
    out = engine.decompress(data)
    want = np.asarray(Image.open(stream.with_suffix(".png")).convert("RGB"))
    diff = np.abs(out.astype(np.int16) - want.astype(np.int16))
    assert out.shape == want.shape == golden_image().shape
    assert diff.max() <= 1 and diff.mean() < 0.01, f"max {diff.max()}, mean {diff.mean():.4f}"
    assert psnr_uint8(out, golden_image()) > 20  # and it is the golden image, coded
