"""The shared photo set: 001–040 train, 041–049 held out for evaluation by every model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
TRAIN_IDS = range(1, 41)
HOLDOUT_IDS = range(41, 50)


def list_images(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def photo_split(folder: str | Path, split: str) -> list[Path]:
    """Files of ``split`` ('train' | 'holdout' | 'all') by the leading number in the name.

    Files without a leading number are only part of 'all' (so e.g. CBSD68 is never 'train').
    """
    ids = {"train": TRAIN_IDS, "holdout": HOLDOUT_IDS}.get(split)
    out = []
    for p in list_images(folder):
        m = re.match(r"(\d+)", p.stem)
        if split == "all" or (ids is not None and m and int(m.group(1)) in ids):
            out.append(p)
    return out


def load_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()
