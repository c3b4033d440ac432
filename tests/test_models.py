"""Model registry, checkpoints, tiled inference and a training smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import checkpoint, registry
from models.denoiser import ResUNetDenoiser, macs_per_pixel
from pipeline.infer import DenoiseEngine
from pipeline.tiling import tile_starts
from tests.conftest import make_image


def test_registry_round_trip(tmp_path: Path) -> None:
    assert "resunet-denoiser" in registry.names("denoiser")
    cfg = registry.make_config("resunet-denoiser", "small")
    model = registry.build("resunet-denoiser", cfg)
    sha = checkpoint.save(tmp_path / "m", "resunet-denoiser", cfg, model, {"steps": 7})
    ck = checkpoint.load(tmp_path / "m.safetensors")
    assert ck.config == cfg and ck.sha256 == sha and ck.meta["steps"] == 7
    for a, b in zip(model.state_dict().values(), ck.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(KeyError, match="unknown model"):
        registry.get("nope")
    with pytest.raises(ValueError, match="unknown config fields"):
        registry.config_from_dict(type(cfg), {"channels": [8], "bogus": 1})


def test_tampered_checkpoint_refused(tmp_path: Path) -> None:
    cfg = registry.make_config("resunet-denoiser", "tiny")
    checkpoint.save(tmp_path / "m", "resunet-denoiser", cfg, registry.build("resunet-denoiser", cfg))
    f = tmp_path / "m.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="sha256 mismatch"):
        checkpoint.load(f)
    # a sidecar that points at another architecture cannot smuggle in config values either
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["config"]["evil"] = "__import__('os')"
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises((checkpoint.CheckpointError, ValueError)):
        checkpoint.load(f)


def test_shipped_checkpoint_loads_and_is_small() -> None:
    path = checkpoint.resolve("denoiser-base")
    assert path.stat().st_size < 8 << 20
    meta = checkpoint.read_meta(path)
    assert meta["steps"] > 0 and meta["training_data"]["holdout"]
    assert not any(n in meta["training_data"]["files"] for n in meta["training_data"]["holdout"])
    ck = checkpoint.load("denoiser-base")
    assert isinstance(ck.model, ResUNetDenoiser) and macs_per_pixel(ck.model) > 0


def test_tile_starts_cover_everything() -> None:
    for length in (8, 100, 512, 513, 1300):
        starts = tile_starts(length, 128, 16)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + min(128, length)] = True
        assert covered.all() and starts[-1] + min(128, length) == length


def test_tiled_equals_whole_image(tiny_checkpoint: str) -> None:
    torch.manual_seed(0)
    img = make_image(200, 150, 3, noise=20)
    whole = DenoiseEngine(tiny_checkpoint, device="cpu", tile=1024).denoise_one(img)
    tiled = DenoiseEngine(tiny_checkpoint, device="cpu", tile=64, overlap=16).denoise_one(img)
    assert whole.shape == tiled.shape == img.shape
    diff = np.abs(whole.astype(int) - tiled.astype(int))
    assert diff.max() <= 2, diff.max()


def test_self_ensemble_is_rotation_equivariant(tiny_checkpoint: str) -> None:
    """Averaging over the whole dihedral group makes the output turn with the input (the plain
    network does not), and x4/x2 are their own views' means; odd sizes still work."""
    eng = DenoiseEngine(tiny_checkpoint, device="cpu", tile=1024)
    torch.manual_seed(0)
    with torch.no_grad():  # the tiny checkpoint is near the identity, which every view agrees on
        for p in eng.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    img = make_image(64, 64, 5, noise=25)
    turned = np.ascontiguousarray(np.rot90(img))
    x8 = eng.denoise_one(img, 25.0, ensemble=8)
    x8_turned = eng.denoise_one(turned, 25.0, ensemble=8)
    assert np.abs(np.rot90(x8).astype(int) - x8_turned.astype(int)).max() <= 1
    x1 = eng.denoise_one(img, 25.0)
    assert np.abs(np.rot90(x1).astype(int) - eng.denoise_one(turned, 25.0).astype(int)).max() > 1
    assert not np.array_equal(eng.denoise_one(img, 25.0, ensemble=2), x1)
    odd = make_image(17, 33, 2)
    assert eng.denoise_one(odd, ensemble=4).shape == odd.shape
    with pytest.raises(ValueError, match="ensemble"):
        eng.denoise_one(img, ensemble=3)


def test_odd_sizes_and_batches(tiny_checkpoint: str) -> None:
    eng = DenoiseEngine(tiny_checkpoint, device="cpu", tile=64, batch_size=3)
    imgs = [make_image(w, h, i) for i, (w, h) in enumerate([(1, 1), (17, 33), (70, 9), (64, 64)])]
    outs, emb = eng.denoise(imgs)
    assert [o.shape for o in outs] == [i.shape for i in imgs]
    assert emb.shape == (4, eng.embedding_dim) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    alone = eng.denoise_one(imgs[1])
    assert np.array_equal(alone, outs[1])


def test_training_smoke_lowers_loss(tmp_path: Path) -> None:
    from jobs.train import TrainConfig, holdout_set, psnr, run

    data = tmp_path / "photos"
    data.mkdir()
    for i in range(1, 4):
        Image.fromarray(make_image(160, 128, i)).save(data / f"{i:03d}.png")
    Image.fromarray(make_image(160, 128, 9)).save(data / "041.png")
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), preset="tiny", steps=120, lr=3e-3,
                      eval_every=60, save_every=60, pixels_per_batch=8 * 64 * 64, eval_crop=64, threads=1)
    # the untrained model is the identity (zero-initialised output layer): its held-out PSNR
    # is that of the noisy input; training must beat it
    pairs = holdout_set(str(data), 64)
    noisy_psnr = float(np.mean([psnr(n, c) for n, c in pairs]))
    result = run(cfg, workers=0)
    curve = result["curve"]
    assert curve[-1]["holdout_psnr"] > noisy_psnr + 1.0, (noisy_psnr, curve)
    ck = checkpoint.load(tmp_path / "run" / "last.safetensors")
    assert ck.meta["steps"] == 120 and ck.meta["training_data"]["holdout"] == ["041.png"]
    # resume continues the step count
    res2 = run(TrainConfig(**{**cfg.__dict__, "steps": 130, "resume": str(tmp_path / "run" / "last")}), workers=0)
    assert res2["steps"] == 130


def test_training_refuses_cbsd68(tmp_path: Path) -> None:
    from jobs.train import TrainConfig, run

    with pytest.raises(SystemExit, match="evaluation only"):
        run(TrainConfig(data=str(tmp_path / "CBSD68"), out=str(tmp_path / "o")), workers=0)
