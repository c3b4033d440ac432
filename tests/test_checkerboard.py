"""Checkerboard context model: the second pass sees only anchors (in training and in the
integer coder), its integer networks are exact, a fresh model codes as the hyperprior it was
initialised from, streams round-trip at odd sizes and bad streams raise."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from jobs.train_codec import CodecTrainConfig, run
from models import bitstream, checkpoint, registry
from models.checkerboard import NAME, CheckerboardCodec, anchor_mask
from models.codec import CodecEngine, FactorizedCodec, macs_per_pixel
from models.hyperprior import IntegerSynthesis, IntLayer
from tests.test_codec import (
    _photo_dir,
    assert_forged_payloads_raise_or_decode,
    assert_round_trips,
    assert_truncations_and_bit_flips_raise,
    image,
    save_codec,
)
from tests.test_hyperprior import _ref_integer_synthesis
from tests.test_hyperprior import tiny_model as tiny_hyper

torch.set_num_threads(1)


def tiny_model(seed: int = 0, context: float = 0.3) -> CheckerboardCodec:
    """A tiny checkerboard codec whose context correction is switched on (``context`` is the
    spread of the correction layer's weights; 0 leaves the fresh model's zeros)."""
    torch.manual_seed(seed)
    model = registry.build(NAME, registry.make_config(NAME, "tiny"))
    assert isinstance(model, CheckerboardCodec)
    with torch.no_grad():
        model.ep[-1].weight.normal_(0, context) if context else None
    model.eval()
    model.update_tables()
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_codec(tiny_model(), tmp_path_factory.mktemp("cck") / "tiny-checkerboard")


def test_anchor_mask() -> None:
    assert anchor_mask(2, 3).tolist() == [[True, False, True], [False, True, False]]
    assert anchor_mask(1, 1).tolist() == [[True]]


def test_second_pass_sees_only_anchors() -> None:
    """Changing a non-anchor never changes any parameter; changing an anchor changes its
    non-anchor neighbours' — in the float model (training) and in the integer coder."""
    model = tiny_model(2)
    m, h, w = model.config.latent_channels, 6, 7
    anchor = anchor_mask(h, w)
    torch.manual_seed(0)
    z = torch.randn(1, m, h, w) * 3
    params = torch.randn(1, 2 * m, h, w)
    base = model._latent(z, params)[2]  # the means
    z2 = z.clone()
    z2[0, :, 2, 3] += 5.0  # a non-anchor (2 + 3 odd)
    assert torch.equal(model._latent(z2, params)[2][..., ~anchor], base[..., ~anchor] * 1)
    z3 = z.clone()
    z3[0, :, 2, 2] += 5.0  # an anchor
    changed = (model._latent(z3, params)[2] != base).any(dim=1)[0]
    assert changed[2, 3] and changed[1, 2] and not changed[~anchor].all()
    assert not changed[anchor].any()  # anchors' own parameters come from the hyperprior only

    p_int = torch.from_numpy(np.random.default_rng(0).integers(-2000, 2000, (2 * m, h, w))).double()
    sym = np.random.default_rng(1).integers(-5, 6, (m, h, w)).astype(np.int32)
    ref = model._int_refine(sym, p_int, anchor)
    sym_n = sym.copy()
    sym_n[:, ~anchor.numpy()] += 7
    assert torch.equal(model._int_refine(sym_n, p_int, anchor), ref)
    sym_a = sym.copy()
    sym_a[:, 2, 2] += 7
    assert not torch.equal(model._int_refine(sym_a, p_int, anchor)[:, 2, 3], ref[:, 2, 3])


def test_integer_context_networks_are_exact() -> None:
    """The integer ctx and ep give exactly the int64 loops' result, with 1 and 2 threads."""
    model = tiny_model(3)
    assert model.int_ctx is not None and model.int_ep is not None
    rng = np.random.default_rng(0)
    for spread in (300, 2**20):
        x = rng.integers(-spread, spread + 1, (model.ctx[0].in_channels, 5, 6))
        for net in (model.int_ctx,):
            np.testing.assert_array_equal(net(x).numpy().astype(np.int64), _ref_integer_synthesis(net, x))
        x_ep = rng.integers(-spread, spread + 1, (model.ep[0].in_channels, 3, 4))
        for threads in (1, 2):
            torch.set_num_threads(threads)
            np.testing.assert_array_equal(model.int_ep(x_ep).numpy().astype(np.int64),
                                          _ref_integer_synthesis(model.int_ep, x_ep))
    torch.set_num_threads(1)


def test_integer_refinement_golden_output() -> None:
    """Fixed integer networks, symbols and parameters → pinned second-pass parameters (no float
    anywhere: pins the anchors' inputs, the masking, the concatenations and the residual)."""
    model = tiny_model()
    m, c, e = model.config.latent_channels, model.config.ctx_channels, model.config.ep_channels
    rng = np.random.default_rng(7)
    mk = lambda *s: torch.from_numpy(rng.integers(-4000, 4000, s).astype(np.float64))  # noqa: E731
    model.int_ctx = IntegerSynthesis([IntLayer(mk(c, 2 * m, 5, 5), mk(c), 5, False, 1, 2, 0, False)])
    model.int_ep = IntegerSynthesis([IntLayer(mk(e, c + 2 * m, 1, 1), mk(e), 12, False, 1, 0, 0, True),
                                     IntLayer(mk(2 * m, e, 1, 1), mk(2 * m), 14, False, 1, 0, 0, False)])
    h, w = 4, 5
    sym = rng.integers(-6, 7, (m, h, w)).astype(np.int32)
    params = torch.from_numpy(rng.integers(-3000, 3000, (2 * m, h, w)).astype(np.float64))
    out = model._int_refine(sym, params, anchor_mask(h, w)).numpy().astype("<i8")
    r = sym.astype(np.int64) * anchor_mask(h, w).numpy()
    ctx = _ref_integer_synthesis(model.int_ctx, np.concatenate([r, np.abs(r)]))
    ref = params.numpy().astype(np.int64) + _ref_integer_synthesis(
        model.int_ep, np.concatenate([ctx, params.numpy().astype(np.int64)]))
    np.testing.assert_array_equal(out, ref)
    assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == GOLDEN_REFINE_SHA


GOLDEN_REFINE_SHA = "ab6e1c1c0feec664"


@pytest.mark.parametrize("hw", [(1, 1), (2, 1), (17, 33), (37, 53), (64, 80)])
def test_round_trip_shapes_and_determinism(hw: tuple[int, int]) -> None:
    assert_round_trips(tiny_model(), hw)


def test_decoded_image_matches_the_float_model() -> None:
    """The coder's reconstruction is the model's own (eval-mode forward) up to the integer
    networks' rounding: a wrong second pass would decode garbage. (A small correction: with
    large random ones a 1-step rounding difference of one anchor moves its neighbours' means a
    lot, and the float model is only an approximation of the coder.)"""
    model = tiny_model(4, context=0.1)
    img = image(48, 64)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    for q in (1, model.config.num_qualities):
        rec = model.decompress(model.compress(img, q)).astype(np.float64)
        with torch.inference_mode():
            ref = (model(x, q)["x_hat"].clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255)
        assert np.abs(rec - ref).mean() < 1.0


def test_fresh_model_codes_as_its_hyperprior(tmp_path: Path) -> None:
    """``--init-from`` a hyperprior: with the zero-initialised correction the checkerboard codec
    decodes to exactly the hyperprior's image, at about its rate."""
    from jobs.train_codec import init_from

    src = tiny_hyper(6)
    src_path = tmp_path / "hyper"
    save_codec(src, src_path)
    model = registry.build(NAME, registry.make_config(NAME, "tiny"))
    assert isinstance(model, CheckerboardCodec)
    copied = init_from(model, str(src_path))
    assert any(k.startswith("density.") for k in copied)  # hyperprior → hyperprior: side density too
    model.eval()
    model.update_tables()
    img = image(45, 70)
    for q in (1, 4, model.config.num_qualities):
        a, b = src.compress(img, q), model.compress(img, q)
        np.testing.assert_array_equal(model.decompress(b), src.decompress(a))
        assert abs(len(a) - len(b)) <= 12  # the anchors' length and one more coder flush


def test_engine_round_trip_and_integer_networks_rebuilt(ckpt: Path, tmp_path: Path) -> None:
    """A release stores float weights only: the integer networks rebuilt from them on load are
    exactly those the full checkpoint stores (same streams, same images)."""
    engine = CodecEngine(str(ckpt), threads=1)
    assert engine.name == NAME
    img = image(40, 56)
    data = engine.compress(img)
    assert engine.decompress(data).shape == img.shape
    model = tiny_model()
    path = tmp_path / "slim"
    slim_tensors = model.coding_tensors(integer_networks=False)
    assert not any(k.startswith(("ctx_int.0", "ep_int.0", "hyper_int.0")) for k in slim_tensors)
    slim = CodecEngine(str(save_codec(model, path, slim_tensors)))
    assert slim.model.int_ctx is not None and model.int_ctx is not None
    for a, b in zip(slim.model.int_ctx.layers, model.int_ctx.layers, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.shift == b.shift
    for q in (1, 4):
        assert bitstream.unpack(slim.compress(img, q))[1] == bitstream.unpack(engine.compress(img, q))[1]
    np.testing.assert_array_equal(slim.model.decompress(data), engine.decompress(data))
    no_thresholds = {k: v for k, v in slim_tensors.items() if k != "hyper_int.thresholds"}
    with pytest.raises(checkpoint.CheckpointError, match="thresholds"):
        CodecEngine(str(save_codec(model, tmp_path / "bad", no_thresholds)))
    with pytest.raises(bitstream.BitstreamError, match="made by model"):
        tiny_hyper().decompress(data)


def test_corrupted_streams_raise_not_crash(ckpt: Path) -> None:
    engine = CodecEngine(str(ckpt))
    data = engine.compress(image(33, 47), 4)
    assert_truncations_and_bit_flips_raise(engine, data, flip_every=7)
    assert_forged_payloads_raise_or_decode(engine, data, tries=40, lengths=2)


def test_macs_include_the_context_model_on_both_sides() -> None:
    model = tiny_model()
    hyper = macs_per_pixel(tiny_hyper())
    macs = macs_per_pixel(model)
    m, c, e = model.config.latent_channels, model.config.ctx_channels, model.config.ep_channels
    extra = (2 * m * c * 25 + (c + 2 * m) * e + e * 2 * m) / 256  # at the latent's 1/16 resolution
    assert macs["encoder"] == pytest.approx(hyper["encoder"] + extra)
    assert macs["decoder"] == pytest.approx(hyper["decoder"] + extra)


def tiny_run(tmp_path: Path, src: FactorizedCodec, steps: int, **kw: Any) -> CodecTrainConfig:
    """A short tiny checkerboard training run in ``tmp_path``, initialised from ``src``."""
    src_path = tmp_path / "src"
    save_codec(src, src_path)
    return CodecTrainConfig(
        data=str(_photo_dir(tmp_path / "photos")), out=str(tmp_path / "run"), model=NAME,
        preset="tiny", steps=steps, lr=2e-3, warmup=1, batch=7, crop=64, threads=1,
        eval_every=steps, save_every=steps, eval_crop=64, init_from=str(src_path),
        release=str(tmp_path / "release"), **kw,
    )


def test_training_the_context_model_from_a_hyperprior(tmp_path: Path) -> None:
    """``aejob train codec --model checkerboard-codec --init-from HYPER --freeze-steps``: only
    the entropy models learn, the context correction moves off zero, the release codes."""
    src = tiny_hyper()
    result = run(tiny_run(tmp_path, src, 8, freeze_steps=8), workers=0)
    assert all(p["bpp"] > 0 for p in result["curve"][-1]["holdout"])
    trained = checkpoint.load(tmp_path / "run" / "last").model
    assert isinstance(trained, CheckerboardCodec)
    torch.testing.assert_close(trained.g_a[0].weight, src.g_a[0].weight)
    assert trained.ep[-1].weight.abs().sum() > 0
    engine = CodecEngine(str(tmp_path / "release"))
    img = image(30, 30)
    assert engine.decompress(engine.compress(img)).shape == img.shape


# ------------------------------------------------------------------ decoder post-filter
def test_fresh_post_filter_is_the_identity_and_counts_on_the_decoder() -> None:
    from models.codec import PostFilter

    post = PostFilter(8, 3, qualities=4)
    x = torch.rand(2, 3, 16, 32)
    torch.testing.assert_close(post(x, torch.tensor([0, 3])), x)
    cfg = registry.make_config(NAME, "tiny", post_channels=8, post_layers=3)
    with_post = registry.build(NAME, cfg)
    plain = macs_per_pixel(tiny_model())
    macs = macs_per_pixel(with_post)
    # at half resolution: 12→8, 8→8, 8→12 3x3 convolutions, per image pixel
    assert macs["decoder"] - plain["decoder"] == pytest.approx((12 * 8 + 8 * 8 + 8 * 12) * 9 / 4)
    assert macs["encoder"] == pytest.approx(plain["encoder"])


def test_post_stage_trains_only_the_post_filter(tmp_path: Path) -> None:
    """``aejob train codec --stage post --init-from CODEC``: the codec's weights, hence its
    streams, stay as they were; the filter learns, and the release decodes through it."""
    src = tiny_model(context=0.05)
    cfg = tiny_run(tmp_path, src, 6, stage="post")
    with pytest.raises(SystemExit, match="post-filter"):
        run(cfg, workers=0)
    registry.get(NAME).presets["tiny-post"] = {**registry.get(NAME).presets["tiny"], "post_channels": 8}
    try:
        run(dataclasses.replace(cfg, preset="tiny-post"), workers=0)
    finally:
        del registry.get(NAME).presets["tiny-post"]
    trained = checkpoint.load(tmp_path / "run" / "last").model
    assert isinstance(trained, CheckerboardCodec) and trained.post is not None
    for name, t in src.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name], t, msg=name)
    assert trained.post.out.weight.abs().sum() > 0
    trained.eval()
    trained.update_tables()
    img = image(32, 48)
    data_src = src.compress(img, 3)
    assert trained.compress(img, 3) == data_src
    assert not np.array_equal(trained.decompress(data_src), src.decompress(data_src))
    engine = CodecEngine(str(tmp_path / "release"))
    assert engine.decompress(engine.compress(img, 3)).shape == img.shape

