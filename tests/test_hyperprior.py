"""Mean-scale hyperprior codec: the integer hyper-synthesis is exact, indexed entropy coding
is pinned by golden bytes, streams round-trip at odd sizes and bad streams raise."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import bitstream, checkpoint, registry
from models.codec import CodecEngine, macs_per_pixel
from models.entropy import (
    EntropyTables,
    build_gaussian_tables,
    decode_rows,
    encode_rows,
    encode_symbols,
    scale_table,
)
from models.hyperprior import NAME, HyperpriorCodec, IntegerSynthesis, IntLayer
from tests.test_codec import (
    _photo_dir,
    assert_forged_payloads_raise_or_decode,
    assert_round_trips,
    assert_truncations_and_bit_flips_raise,
    image,
    save_codec,
)

torch.set_num_threads(1)


def tiny_model(seed: int = 0) -> HyperpriorCodec:
    torch.manual_seed(seed)
    model = registry.build(NAME, registry.make_config(NAME, "tiny"))
    assert isinstance(model, HyperpriorCodec)
    model.eval()
    model.update_tables()
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_codec(tiny_model(), tmp_path_factory.mktemp("hck") / "tiny-hyper")


# ------------------------------------------------------------------ integer hyper-synthesis
def _ref_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Plain int64 loops (no BLAS, no floats): the definition of the convolution."""
    c, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.empty((o, ho, wo), np.int64)
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, i * stride : i * stride + k, j * stride : j * stride + k]
            out[:, i, j] = np.tensordot(w, patch, axes=([1, 2, 3], [0, 1, 2])) + b
    return out


def _ref_deconv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int, opad: int) -> np.ndarray:
    c, h, wd = x.shape
    _, o, k, _ = w.shape
    full = np.zeros((o, (h - 1) * stride + k + opad, (wd - 1) * stride + k + opad), np.int64)
    for i in range(h):
        for j in range(wd):
            full[:, i * stride : i * stride + k, j * stride : j * stride + k] += np.tensordot(
                x[:, i, j], w, axes=([0], [0]))
    ho, wo = (h - 1) * stride - 2 * pad + k + opad, (wd - 1) * stride - 2 * pad + k + opad
    return full[:, pad : pad + ho, pad : pad + wo] + b[:, None, None]


def _ref_integer_synthesis(net: IntegerSynthesis, sym: np.ndarray) -> np.ndarray:
    x = np.clip(sym.astype(np.int64), -(2**24), 2**24)
    for lay in net.layers:
        w, b = lay.weight.numpy().astype(np.int64), lay.bias.numpy().astype(np.int64)
        if lay.transposed:
            acc = _ref_deconv(x, w, b, lay.stride, lay.padding, lay.output_padding)
        else:
            acc = _ref_conv(x, w, b, lay.stride, lay.padding)
        x = (acc + (1 << (lay.shift - 1))) >> lay.shift if lay.shift > 0 else acc << -lay.shift
        if lay.leaky:
            x = np.where(x < 0, x >> 3, x)
        x = np.clip(x, -(2**24), 2**24)
    return x


def test_integer_synthesis_equals_exact_integer_arithmetic() -> None:
    """The float64 convolutions give exactly the int64 result, even with large activations."""
    model = tiny_model(3)
    net = IntegerSynthesis.from_float(model.h_s, frac_bits=8, weight_bits=13)
    rng = np.random.default_rng(0)
    for shape, spread in (((8, 3, 5), 4), ((8, 1, 1), 2), ((8, 4, 2), 3000)):
        sym = rng.integers(-spread, spread + 1, shape)
        got = net(sym).numpy()
        assert np.all(got == np.round(got))
        np.testing.assert_array_equal(got.astype(np.int64), _ref_integer_synthesis(net, sym))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        np.testing.assert_array_equal(net(sym).numpy(), _ref_integer_synthesis(net, sym))
    torch.set_num_threads(1)


def test_integer_synthesis_golden_output() -> None:
    """Fixed integer weights and symbols → pinned output bytes (no float anywhere)."""
    rng = np.random.default_rng(7)
    mk = lambda *s: torch.from_numpy(rng.integers(-4000, 4000, s).astype(np.float64))  # noqa: E731
    net = IntegerSynthesis([
        IntLayer(mk(4, 6, 5, 5), mk(6), 11, True, 2, 2, 1, True),
        IntLayer(mk(8, 6, 3, 3), mk(8), 12, False, 1, 1, 0, False),
    ])
    sym = rng.integers(-3, 4, (4, 2, 3))
    out = net(sym).numpy().astype("<i8")
    np.testing.assert_array_equal(out, _ref_integer_synthesis(net, sym))
    assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == GOLDEN_INT_SHA
    stored = net.to_tensors()
    assert stored["hyper_int.0.weight"].dtype == torch.int16  # |w| < 2**15: 2 bytes each
    net2 = IntegerSynthesis.from_tensors(stored)
    np.testing.assert_array_equal(net2(sym).numpy(), net(sym).numpy())
    # releases before int16 storage hold int32 weights: they load to the same network
    old = {k: v.to(torch.int32) if k.endswith("weight") else v for k, v in stored.items()}
    np.testing.assert_array_equal(IntegerSynthesis.from_tensors(old)(sym).numpy(), net(sym).numpy())


GOLDEN_INT_SHA = "53cbbf32244bad20"


def test_integer_synthesis_tracks_the_float_network() -> None:
    model = tiny_model(1)
    sym = torch.from_numpy(np.random.default_rng(1).integers(-3, 4, (1, 8, 3, 4)).astype(np.float32))
    with torch.inference_mode():
        ref = model.h_s(sym)[0].double().numpy()
    assert model.int_hs is not None
    got = model.int_hs(sym[0].numpy().astype(np.int64)).numpy() / 2**model.config.frac_bits
    assert np.abs(got - ref).max() < 0.02 * max(1.0, np.abs(ref).max())


# ------------------------------------------------------------------ indexed entropy coding
GOLDEN_ROWS_HEX = "7d4ed1d66c08353d8c647c67"


def test_golden_indexed_stream() -> None:
    """encode_rows with fixed integer tables: pinned bytes, exact values back; the factorized
    coder's stream is the special case rows = channel."""
    f0, f1 = [4096, 20000, 30000, 11000, 440], [60000, 5535, 1]
    cdf = np.full((2, 6), 1 << 16)
    cdf[0] = np.concatenate([[0], np.cumsum(f0)])
    cdf[1, :4] = np.concatenate([[0], np.cumsum(f1)])
    t = EntropyTables(cdf, lengths=[4, 2], offsets=[-2, 0], precision=16)
    values = np.array([0, 1, -1, -2, 1, 0, 7, 0, -5, 1, 0, 300, 0, 1], np.int64)
    rows = np.array([1, 0, 0, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 0])
    data = encode_rows(values, rows, t)
    assert data.hex() == GOLDEN_ROWS_HEX
    np.testing.assert_array_equal(decode_rows(data, rows, t), values)
    chans = np.array([[[0, 1, -1], [7, 0, -5]], [[0, 1, 300], [1, 0, 0]]], np.int32)
    by_channel = np.repeat([0, 1], 6)
    assert encode_symbols(chans, t) == encode_rows(chans.reshape(-1), by_channel, t)
    with pytest.raises(ValueError):
        encode_rows(values, rows[:-1], t)
    with pytest.raises(ValueError):
        encode_rows(values, rows + 5, t)


def test_gaussian_tables_cover_their_scales() -> None:
    scales = scale_table(0.11, 256, 16)
    t = build_gaussian_tables(scales)
    assert t.rows == 16
    half = -t.offsets
    assert half[0] >= 1 and np.all(np.diff(half) >= 0) and half[-1] == 1024  # capped
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 16, 500)
    values = np.round(rng.normal(0, scales[rows] * 1.5)).astype(np.int64)  # escapes included
    data = encode_rows(values, rows, t)
    np.testing.assert_array_equal(decode_rows(data, rows, t), values)
    # a narrow table codes zeros in far fewer bits than a wide one
    zeros = np.zeros(400, np.int64)
    assert len(encode_rows(zeros, np.zeros(400, int), t)) < len(encode_rows(zeros, np.full(400, 15), t))


# ------------------------------------------------------------------ the codec
@pytest.mark.parametrize("hw", [(1, 1), (17, 33), (37, 53), (64, 80)])
def test_round_trip_shapes_and_determinism(hw: tuple[int, int]) -> None:
    assert_round_trips(tiny_model(), hw)


def test_engine_round_trip_and_tables_required(ckpt: Path, tmp_path: Path) -> None:
    engine = CodecEngine(str(ckpt), threads=1)
    img = image(40, 56)
    data = engine.compress(img)
    assert engine.decompress(data).shape == img.shape
    model = tiny_model()
    path = tmp_path / "notables"
    tensors = {k: v for k, v in model.coding_tensors().items() if not k.startswith("gauss.")}
    checkpoint.save(path, NAME, model.config, model, {"kind": "codec"}, extra_tensors=tensors)
    with pytest.raises(checkpoint.CheckpointError, match="entropy tables"):
        CodecEngine(str(path))
    # a factorized engine refuses a hyperprior stream (and says why)
    from tests.test_codec import tiny_model as tiny_factorized

    with pytest.raises(bitstream.BitstreamError, match="made by model"):
        tiny_factorized().decompress(data)


def test_corrupted_streams_raise_not_crash(ckpt: Path) -> None:
    engine = CodecEngine(str(ckpt))
    data = engine.compress(image(33, 47), 4)
    assert_truncations_and_bit_flips_raise(engine, data, flip_every=7)
    assert_forged_payloads_raise_or_decode(engine, data, tries=30)


def test_macs_include_the_hyper_synthesis_on_both_sides() -> None:
    model = tiny_model()
    macs = macs_per_pixel(model)
    fact = 150 + 100 + 25 + 6.25 + 16 + 4 + 1  # g_a (= g_s) of the tiny preset, as in test_codec
    # h_a: 8·8·9/256 + 8·8·25/1024 + 8·8·25/4096; h_s: 8·8·25/(4·1024) + 8·12·25/(4·256) + 12·16·9/256
    h_a = 64 * 9 / 256 + 64 * 25 / 1024 + 64 * 25 / 4096
    h_s = 64 * 25 / 4096 + 96 * 25 / 1024 + 192 * 9 / 256
    assert macs["encoder"] == pytest.approx(fact + h_a + h_s)
    assert macs["decoder"] == pytest.approx(fact + h_s)
    assert isinstance(model.h_s[-1], nn.Conv2d)


def test_training_from_a_factorized_checkpoint(tmp_path: Path) -> None:
    """``--init-from``: the transforms come from a factorized codec, gains are mapped onto the
    new λ ladder, and the trained hyperprior checkpoint codes real streams."""
    from jobs.train_codec import CodecTrainConfig, init_from, run
    from tests.test_codec import tiny_model as tiny_factorized

    src = tiny_factorized()
    src_path = tmp_path / "fact"
    save_codec(src, src_path)
    model = tiny_model()
    copied = init_from(model, str(src_path))
    assert any(k.startswith("g_a.") for k in copied) and "log_gain" in copied
    assert not any(k.startswith(("h_a.", "h_s.", "density.")) for k in copied)
    torch.testing.assert_close(model.g_s[0].weight, src.g_s[0].weight)
    # the new ladder starts below and ends above the old one: gains extrapolate monotonically
    g = model.log_gain.detach().mean(dim=1)
    assert torch.all(g[1:] > g[:-1])
    data = _photo_dir(tmp_path / "photos")
    cfg = CodecTrainConfig(
        data=str(data), out=str(tmp_path / "run"), model=NAME, preset="tiny", steps=12, lr=2e-3,
        warmup=2, batch=6, crop=64, threads=1, eval_every=6, save_every=6, eval_crop=64,
        init_from=str(src_path), release=str(tmp_path / "release"), freeze_steps=12,
    )
    result = run(cfg, workers=0)
    assert [p["step"] for p in result["curve"]] == [6, 12]
    assert all(p["bpp"] > 0 for p in result["curve"][-1]["holdout"])
    engine = CodecEngine(str(tmp_path / "release"))
    assert engine.name == NAME
    img = image(30, 30)
    assert engine.decompress(engine.compress(img)).shape == img.shape
    # frozen for all 12 steps: the transforms and gains are still the source's, h_s learned
    trained = checkpoint.load(tmp_path / "run" / "last").model
    torch.testing.assert_close(trained.g_a[0].weight, src.g_a[0].weight)
    torch.testing.assert_close(trained.log_gain, model.log_gain)
    assert not torch.equal(trained.h_s[0].weight, tiny_model().h_s[0].weight)


def test_frozen_groups_ramp_up_after_the_freeze() -> None:
    from jobs.train_codec import CodecTrainConfig, group_lr

    cfg = CodecTrainConfig(data="d", out="o", freeze_steps=100, warmup=10)
    frozen, free = {"freeze": True, "lr_mult": 2.0}, {"freeze": False, "lr_mult": 1.0}
    assert group_lr(frozen, 1e-3, 99, cfg) == 0.0 and group_lr(free, 1e-3, 0, cfg) == 1e-3
    assert group_lr(frozen, 1e-3, 100, cfg) == pytest.approx(2e-4)
    assert group_lr(frozen, 1e-3, 110, cfg) == pytest.approx(2e-3)
    no_freeze = CodecTrainConfig(data="d", out="o")
    assert group_lr(frozen, 1e-3, 0, no_freeze) == pytest.approx(2e-3)


def test_widening_keeps_what_the_narrow_model_computes(tmp_path: Path) -> None:
    """``--init-from`` into a model with more latent channels (preset ``wide`` from ``small``):
    the widened model reconstructs exactly what the narrow one did, and predicts the same means
    and scales for the old channels, so training starts from the trained model, not below it."""
    from jobs.train_codec import init_from

    src = tiny_model()
    src_path = tmp_path / "narrow"
    save_codec(src, src_path)
    m0 = src.config.latent_channels
    cfg = registry.make_config(NAME, "tiny", latent_channels=2 * m0, hyper_mid=m0 * 3 // 2)
    torch.manual_seed(1)
    wide = registry.build(NAME, cfg)
    copied = init_from(wide, str(src_path))
    assert {"g_a.6.weight", "g_s.0.weight", "h_a.0.weight", "h_s.4.weight", "log_gain"} <= set(copied)
    assert any(k.startswith("density.") for k in copied)  # same kind: the side density too
    src.eval()
    wide.eval()
    x = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        for q in (1, src.config.num_qualities):
            a, b = wide(x, q), src(x, q)
            torch.testing.assert_close(a["x_hat"], b["x_hat"])
            torch.testing.assert_close(a["likelihoods"]["z"], b["likelihoods"]["z"])
            torch.testing.assert_close(a["likelihoods"]["y"][:, :m0], b["likelihoods"]["y"])
            z = wide.analysis(x) * torch.exp(wide.log_gain[q - 1])[None, :, None, None]
            assert z[:, m0:].abs().mean() > 0.1 * z[:, :m0].abs().mean()  # new channels are used
        w_sym = torch.ones(1, cfg.hyper_channels, 2, 2)
        mean_w, scale_w = wide._mean_scale(wide.h_s(w_sym))
        mean_s, scale_s = src._mean_scale(src.h_s(w_sym))
        torch.testing.assert_close(mean_w[:, :m0], mean_s)
        torch.testing.assert_close(scale_w[:, :m0], scale_s)
        assert torch.all(mean_w[:, m0:] == 0)
    # the rate ramp: only the new channels' bits are discounted, and only during the ramp
    from jobs.train_codec import CodecTrainConfig, new_channel_weights, rd_loss

    tc = CodecTrainConfig(data="d", out="o", init_from=str(src_path), rate_ramp_steps=100)
    weight = new_channel_weights(wide, tc, 25)
    assert weight is not None and weight[:m0].eq(1).all() and weight[m0:].eq(0.25).all()
    assert new_channel_weights(wide, tc, 100) is None
    q, lam = torch.tensor([1, 2]), torch.tensor(cfg.lambdas)
    torch.manual_seed(3)
    full, _, bpp_full = rd_loss(wide, x, q, lam)
    torch.manual_seed(3)
    ramped, _, bpp_ramped = rd_loss(wide, x, q, lam, weight)
    assert ramped < full and torch.equal(bpp_ramped, bpp_full)
    wide.update_tables()
    img = image(37, 45)
    assert wide.decompress(wide.compress(img, 2)).shape == img.shape
