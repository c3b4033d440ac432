"""Build the bundle a device (GPU) run carries: the device machine reaches nothing, and what
travels with the working tree is capped (64 MiB with the repo), so the training photos go as one
seeded even-offset crop each, lossless WebP, plus center crops of the held-out photos for the
training curve's evaluation, plus the wheels the device's Python lacks.

    python benchmarks/device/prepare.py --photos ../shared/data/photos \
        --extra ../shared/data/photos-extra --out .gpu --crop 448 --wheels /tmp/whl
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from models.data import list_images, load_rgb, photo_split


def crop_at(img: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    h, w = img.shape[:2]
    c = min(size, h, w) // 2 * 2
    if rng is None:  # center
        y, x = (h - c) // 4 * 2, (w - c) // 4 * 2
    else:
        y = 2 * int(rng.integers(0, (h - c) // 2 + 1))
        x = 2 * int(rng.integers(0, (w - c) // 2 + 1))
    return img[y : y + c, x : x + c]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", required=True)
    ap.add_argument("--extra", default="")
    ap.add_argument("--out", default=".gpu")
    ap.add_argument("--crop", type=int, default=448)
    ap.add_argument("--eval-crop", type=int, default=256)
    ap.add_argument("--wheels", default="")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    rng = np.random.default_rng(a.seed)
    sets = [(f"photos-crops{a.crop}", photo_split(a.photos, "train"), a.crop, rng)]
    if a.extra:
        sets.append((f"photos-extra-crops{a.crop}", list_images(a.extra), a.crop, rng))
    sets.append((f"photos-crops{a.crop}", photo_split(a.photos, "holdout"), a.eval_crop, None))
    total = 0
    for folder, files, size, r in sets:
        (out / folder).mkdir(parents=True, exist_ok=True)
        for p in files:
            f = out / folder / f"{p.stem}.webp"
            Image.fromarray(np.ascontiguousarray(crop_at(load_rgb(p), size, r))).save(
                f, "WEBP", lossless=True, quality=100, method=6)
            total += f.stat().st_size
    if a.wheels:
        (out / "wheels").mkdir(parents=True, exist_ok=True)
        for w in Path(a.wheels).glob("*.whl"):
            shutil.copy(w, out / "wheels" / w.name)
            total += w.stat().st_size
    print(f"{total / 1e6:.1f} MB in {out}")


if __name__ == "__main__":
    main()
