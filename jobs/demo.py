"""``aejob demo``: sample photos shipped with scikit-image, noised, cleaned by the real job."""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from models.metrics import psnr_uint8
from models.noise import add_awgn_uint8
from pipeline.export import dataset

log = logging.getLogger(__name__)

SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


psnr = psnr_uint8  # noqa: E305


def sample_images() -> dict[str, np.ndarray]:
    from skimage import data

    out = {}
    for name in SAMPLES:
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out[name] = np.ascontiguousarray(img[..., :3].astype(np.uint8))
    return out


def _thumb(img: np.ndarray, size: int = 320) -> str:
    im = Image.fromarray(img)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _crop(img: np.ndarray, size: int = 160) -> np.ndarray:
    h, w = img.shape[:2]
    y, x = max(0, h // 2 - size // 2), max(0, w // 2 - size // 2)
    return img[y : y + size, x : x + size]


def write_report(folder: Path, rows: list[dict[str, object]]) -> Path:
    cells = []
    for r in rows:
        cells.append(
            f"<tr><td>{html.escape(str(r['name']))}</td>"
            f"<td><img src='{r['noisy']}'><br>noisy {r['psnr_noisy']:.2f} dB</td>"
            f"<td><img src='{r['clean']}'><br>cleaned {r['psnr_clean']:.2f} dB</td>"
            f"<td><img src='{r['truth']}'><br>original</td></tr>"
        )
    mean_n = np.mean([float(r["psnr_noisy"]) for r in rows])  # type: ignore[arg-type]
    mean_c = np.mean([float(r["psnr_clean"]) for r in rows])  # type: ignore[arg-type]
    page = f"""<!doctype html><meta charset=utf-8><title>aejob demo</title>
<style>body{{font-family:sans-serif}} td{{text-align:center;padding:4px}}
img{{width:240px;image-rendering:pixelated}}</style>
<h1>aejob clean — demo</h1><p>Gaussian noise σ=25 (clipped, rounded); centre crops shown.
Mean PSNR: noisy {mean_n:.2f} dB → cleaned {mean_c:.2f} dB.</p>
<table><tr><th>image</th><th>noisy</th><th>cleaned</th><th>original</th></tr>{''.join(cells)}</table>"""
    path = folder / "report.html"
    path.write_text(page)
    return path


def run_demo(folder: Path, sigma: float = 25.0) -> tuple[Path, list[dict[str, object]]]:
    from jobs.clean import CleanConfig, build_spec
    from pipeline import runner

    src = folder / "input"
    src.mkdir(parents=True, exist_ok=True)
    truth = sample_images()
    for i, (name, img) in enumerate(truth.items()):
        Image.fromarray(add_awgn_uint8(img, sigma, seed=i)).save(src / f"{name}.png")
    dst = folder / "cleaned"
    spec = build_spec(CleanConfig(src=str(src), dst=str(dst), overwrite=True), runner.RayOptions())
    result = runner.run_job(spec)
    if not result.ok:
        raise RuntimeError(f"demo job failed: {result.manifest['reason']}")
    table = dataset(str(dst)).to_table(columns=["key", "status", "image"]).to_pylist()
    rows = []
    for r in sorted(table, key=lambda r: r["key"]):
        name = r["key"].rsplit(".", 1)[0]
        clean = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
        noisy = np.asarray(Image.open(src / r["key"]).convert("RGB"))
        rows.append({
            "name": name,
            "psnr_noisy": psnr(noisy, truth[name]),
            "psnr_clean": psnr(clean, truth[name]),
            "noisy": _thumb(_crop(noisy)), "clean": _thumb(_crop(clean)), "truth": _thumb(_crop(truth[name])),
        })
    return write_report(folder, rows), rows
