"""The copy-detection embedder: engine interface, preprocessing, a tiny training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import train_embedder as te
from models.embedder import EmbedderEngine, prepare
from models.regions import REGIONS, RegionSpec
from tests.conftest import make_image


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Numbered photos: 001–006 train, 041 held out (monitoring only)."""
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 5, 6, 41):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((96, 72), Image.Resampling.BILINEAR).save(d / f"{n:03d}.png")
    return d


@pytest.fixture(scope="module")
def trained(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("run")
    cfg = te.EmbedderTrainConfig(data=str(photos), out=str(out), preset="tiny", steps=4, batch=6,
                                 hard_negatives=2, crop=32, eval_every=2, save_every=2, threads=1,
                                 release=str(out / "release"), aug_threads=1)
    result = te.run(cfg, workers=0)
    return out, result


def test_prepare_keeps_aspect_and_caps_it() -> None:
    assert prepare(np.zeros((321, 481, 3), np.uint8), 128, 2.0).shape == (128, 192, 3)
    assert prepare(np.zeros((100, 1000, 3), np.uint8), 64, 2.0).shape == (64, 128, 3)  # centre crop
    assert prepare(np.zeros((1, 1, 3), np.uint8), 16, 2.0).shape == (16, 16, 3)
    assert prepare(np.zeros((20, 10), np.uint8), 16, 2.0).shape == (32, 16, 3)  # grey → 3 channels


def test_training_run_writes_release_with_record(trained: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    out, result = trained
    assert result["steps"] == 4
    meta = json.loads((out / "release.json").read_text())
    assert meta["name"] == "copy-embedder" and meta["kind"] == "embedder" and meta["steps"] == 4
    assert meta["training_data"]["files"] == [f"{n:03d}.png" for n in range(1, 7)]
    assert meta["training_data"]["holdout"] == ["041.png"]
    assert [p["step"] for p in meta["curve"]] == [2, 4]
    assert "holdout_recall_at_1" in meta["curve"][-1] and "loss" in meta["curve"][-1]
    assert -1.0 <= meta["dedup_threshold"] <= 1.1
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out / "release.safetensors"))
    assert all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    assert not any(k.startswith("extra.") for k in tensors)  # no optimizer state in a release


def test_resume_continues_the_step_count(trained: tuple[Path, dict], photos: Path, tmp_path: Path) -> None:  # type: ignore[type-arg]
    out, _ = trained
    cfg = te.EmbedderTrainConfig(data=str(photos), out=str(tmp_path), preset="tiny", steps=6, batch=6,
                                 hard_negatives=2, crop=32, eval_every=2, save_every=2, threads=1,
                                 resume=str(out / "last"), aug_threads=1)
    assert te.run(cfg, workers=0)["steps"] == 6
    meta = json.loads((tmp_path / "last.json").read_text())
    assert [p["step"] for p in meta["curve"]] == [2, 4, 6]


def test_engine_interface(trained: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    out, _ = trained
    eng = EmbedderEngine(str(out / "release"), threads=1, device="cpu")
    assert eng.name == "copy-embedder" and eng.dim == 16
    assert eng.model_id == f"copy-embedder:{eng.sha256[:12]}"
    imgs = [make_image(481, 321, 1), make_image(20, 90, 2), make_image(1, 1, 3), make_image(64, 64, 4)]
    e = eng.embed(imgs)
    assert e.shape == (4, 16) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(eng.embed(imgs[:1])[0], e[0])  # batch composition does not matter
    assert eng.embed([]).shape == (0, 16)


def test_region_windows() -> None:
    assert REGIONS == RegionSpec() and (REGIONS.count, REGIONS.keep, REGIONS.size) == (5, 0.5, 160)
    # a 481x321 photo prepared at 160 is 240x160: windows of sqrt(0.5) of each side, corners + centre
    assert REGIONS.boxes(160, 240) == [(0, 0, 113, 170), (0, 70, 113, 170), (47, 0, 113, 170), (47, 70, 113, 170),
                                       (23, 35, 113, 170)]
    assert json.loads(REGIONS.layout_id()) == {"count": 5, "keep": 0.5, "size": 160, "windows": "corners+centre"}


def test_engine_region_vectors(trained: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    out, _ = trained
    eng = EmbedderEngine(str(out / "release"), threads=1, device="cpu")
    imgs = [make_image(481, 321, 1), make_image(20, 90, 2), make_image(1, 1, 3)]
    full, reg = eng.embed_with_regions(imgs)
    assert full.shape == (3, 16) and reg.shape == (3, 5, 16)
    assert full.dtype == np.float32 and reg.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(reg, axis=2), 1.0, atol=1e-5)
    np.testing.assert_allclose(full, eng.embed(imgs), atol=1e-6)  # one pass shares the work, same vectors
    np.testing.assert_allclose(reg, eng.embed_regions(imgs), atol=1e-6)
    assert eng.embed_regions([]).shape == (0, 5, 16)
    # each window: the image prepared at a shorter side of 160, cut by the spec's boxes, no resize
    p = prepare(imgs[0], 160, eng.config.max_aspect)
    assert p.shape == (160, 240, 3)
    for j, (y, x, h, w) in enumerate(REGIONS.boxes(160, 240)):
        t = torch.from_numpy(np.ascontiguousarray(p[y : y + h, x : x + w])).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            np.testing.assert_allclose(reg[0, j], eng.model(t).numpy()[0], atol=1e-5)


def test_engine_refuses_a_denoiser(tiny_checkpoint: str) -> None:
    with pytest.raises(ValueError, match="not an embedder"):
        EmbedderEngine(tiny_checkpoint, device="cpu")


def test_never_trains_on_cbsd68(tmp_path: Path) -> None:
    cfg = te.EmbedderTrainConfig(data=str(tmp_path / "CBSD68"), out=str(tmp_path / "o"), preset="tiny", steps=1)
    with pytest.raises(SystemExit, match="evaluation only"):
        te.run(cfg, workers=0)


def test_copy_views_and_info_nce() -> None:
    rng = np.random.default_rng(0)
    base = Image.fromarray(make_image(160, 120, 1))
    views = [te.copy_view(base, rng, 32) for _ in range(20)]
    assert all(v.shape == (32, 32, 3) and v.dtype == np.uint8 for v in views)
    inner = te._rotate(base, 15.0, inner=True)
    assert inner.width < base.width and inner.height < base.height
    assert np.asarray(te._rotate(base, 15.0, inner=False))[0, 0].sum() == 0  # black corner
    assert all(np.asarray(inner)[y, x].sum() > 0 for y in (0, -1) for x in (0, -1))  # none inside
    z = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    loss_same, acc_same = te.info_nce(z, z, 0.1)
    loss_rand, _ = te.info_nce(z, torch.nn.functional.normalize(torch.randn(8, 4), dim=1), 0.1)
    assert acc_same == 1.0 and float(loss_same) < float(loss_rand)
