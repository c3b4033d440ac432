"""Mean-scale hyperprior codec (Minnen et al. 2018 without the autoregressive context;
CompressAI's ``MeanScaleHyperprior``), variable-rate like the factorized codec, with an
integer hyper-synthesis so that what selects the coding tables is bit-exact on every machine.

Transforms: ``g_a``/``g_s`` as in :mod:`models.codec`; per quality the latent is scaled by its
gain vector, ``z = y·g_q``. A hyper-analysis ``h_a`` maps ``z`` to a side latent ``w`` at 1/4
of its resolution, coded with a per-quality factorized density (as the factorized codec codes
its latent). A hyper-synthesis ``h_s`` maps the integer symbols of ``w`` to a mean and a scale
for every element of ``z``; ``z`` is coded as ``round(z - mean)`` with the discretized Gaussian
of that scale.

Exactness: a float network's outputs can differ in the last bit between CPUs (summation
order, SIMD width), and a scale that lands on the other side of a table boundary makes the
decoder pick another table: garbage from there on. So the coder never uses the float ``h_s``:
:class:`IntegerSynthesis` is ``h_s`` with integer weights and fixed-point activations
(``frac_bits`` fractional bits, LeakyReLU slope 2**-3 as a shift), built once from the trained
weights and stored with the checkpoint. It runs as float64 convolutions whose every operand and
partial sum is an integer below 2**53 (bounded by clamping the activations), so the result is
exact whatever the order of summation — the same integers on every machine. The table index is
then an integer comparison of the fixed-point log-scale with stored integer thresholds, and the
mean is that integer over 2**frac_bits. Training uses the float ``h_s`` (the integer one
differs by less than 2**-frac_bits per activation).

Stream: the usual header (model, checkpoint id, quality, sizes), then a 4-byte length of the
side stream, the side stream (factorized tables, one row per channel of ``w``) and the main
stream (Gaussian tables, one row per scale level; see ``entropy.encode_rows``).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import bitstream
from models.codec import Analysed, CodecConfig, FactorizedCodec, _conv, _deconv, pad_to_multiple, quantize, to_symbols
from models.entropy import (
    EntropyCodingError,
    EntropyTables,
    FactorizedDensity,
    build_gaussian_tables,
    build_tables,
    decode_rows,
    decode_symbols,
    encode_rows,
    encode_symbols,
    gaussian_likelihood,
    scale_table,
)

NAME = "hyperprior-codec"
# The factorized ladder with one more point below: a hyperprior spends fewer bits at a given λ,
# and the rate points should reach down to about 0.2 bpp on photos.
HYPER_LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932)
SLOPE_SHIFT = 3  # LeakyReLU slope 2**-3: an exact shift in the integer network
SLOPE = 2.0**-SLOPE_SHIFT
HYPER_FACTOR = 4  # h_a downsamples z by 4
ACT_LIMIT = 2**24  # integer activations are clamped to ±this (keeps sums below 2**53)
_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class HyperCodecConfig(CodecConfig):
    lambdas: tuple[float, ...] = HYPER_LAMBDAS
    default_quality: int = 5  # λ = 0.025, the factorized codec's default
    hyper_channels: int = 128  # channels of h_a/h_s and of the side latent w
    hyper_mid: int = 0  # channels of h_s's middle layer (0: 3/2 of latent_channels)
    scale_min: float = 0.11  # coding scales: log-spaced scale_min..scale_max
    scale_max: float = 256.0
    scale_levels: int = 64
    frac_bits: int = 8  # fixed-point fractional bits of the integer hyper-synthesis
    weight_bits: int = 13  # |integer weight| < 2**weight_bits

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.hyper_channels < 1 or self.hyper_mid < 0 or self.scale_levels < 2
                or not 0 < self.scale_min < self.scale_max):
            raise ValueError("bad hyperprior settings")
        if not 0 <= self.frac_bits <= 12 or not 4 <= self.weight_bits <= 16:
            raise ValueError("frac_bits must be 0..12 and weight_bits 4..16")


# --------------------------------------------------------------------------------------------
# the integer hyper-synthesis
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntLayer:
    weight: torch.Tensor  # float64 holding integers, |w| < 2**weight_bits
    bias: torch.Tensor  # float64 holding integers, in accumulator units
    shift: int  # accumulator → output fixed point: / 2**shift, rounded half up (<0: multiply)
    transposed: bool
    stride: int
    padding: int
    output_padding: int
    leaky: bool


def _weight_exponent(peak: float, weight_bits: int) -> int:
    """The largest e with ``peak·2**e <= 2**weight_bits - 1``, in exact arithmetic (frexp, no
    libm ``log2``), so that integer networks rebuilt from stored float weights are the same on
    every machine."""
    if peak <= 0:
        return 0
    mant, exp = math.frexp(peak)  # peak = mant·2**exp, 0.5 <= mant < 1
    return weight_bits - exp if mant <= 1 - 2.0**-weight_bits else weight_bits - 1 - exp


class IntegerSynthesis:
    """``h_s`` in integer arithmetic (see the module docstring for why it is exact).

    Built from float weights by exact operations only (a power-of-two scale found with frexp,
    then rounding), so a checkpoint may store either the integer layers or just the float
    weights they come from: every machine rebuilds the same integers from the same floats."""

    def __init__(self, layers: list[IntLayer]) -> None:
        self.layers = layers

    @classmethod
    def from_float(cls, h_s: nn.Sequential, frac_bits: int, weight_bits: int,
                   in_frac_bits: int = 0) -> IntegerSynthesis:
        """``in_frac_bits``: fixed-point fractional bits of the input (0: the integer symbols of
        w; ``frac_bits`` for a network reading another one's output)."""
        mods = list(h_s)
        layers = []
        a_in = in_frac_bits
        for i, mod in enumerate(mods):
            if not isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
                continue
            leaky = i + 1 < len(mods) and isinstance(mods[i + 1], nn.LeakyReLU)
            w = mod.weight.detach().double()
            b = mod.bias.detach().double() if mod.bias is not None else torch.zeros(w.shape[0])
            e = _weight_exponent(float(w.abs().max()), weight_bits)
            w_int = torch.round(w * 2.0**e)
            b_int = torch.round(b * 2.0 ** (a_in + e))
            if float(b_int.abs().max()) >= 2**50:
                raise EntropyCodingError("hyper-synthesis bias too large for the integer network")
            transposed = isinstance(mod, nn.ConvTranspose2d)
            layers.append(IntLayer(
                w_int, b_int, a_in + e - frac_bits, transposed, int(mod.stride[0]),
                int(mod.padding[0]),  # type: ignore[index]
                int(mod.output_padding[0]) if transposed else 0, leaky,  # type: ignore[union-attr]
            ))
            a_in = frac_bits
        return cls(layers)

    def __call__(self, symbols: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Integers (C, h, w) → float64 tensor of integers (C_out, H, W) in units of
        2**-frac_bits."""
        x = torch.as_tensor(np.asarray(symbols, np.float64))[None]
        x = x.clamp(-ACT_LIMIT, ACT_LIMIT)
        for lay in self.layers:
            if lay.transposed:
                acc = F.conv_transpose2d(x, lay.weight, lay.bias, lay.stride, lay.padding,
                                         lay.output_padding)
            else:
                acc = F.conv2d(x, lay.weight, lay.bias, lay.stride, lay.padding)
            if lay.shift > 0:  # exact: integers below 2**53 and a power-of-two divisor
                x = torch.floor((acc + 2.0 ** (lay.shift - 1)) / 2.0**lay.shift)
            else:
                x = acc * 2.0 ** (-lay.shift)
            if lay.leaky:
                x = torch.where(x < 0, torch.floor(x / 2.0**SLOPE_SHIFT), x)
            x = x.clamp(-ACT_LIMIT, ACT_LIMIT)
        return x[0]

    def to_tensors(self, prefix: str = "hyper_int.") -> dict[str, torch.Tensor]:
        out = {}
        for i, lay in enumerate(self.layers):
            # int16 where the weights fit (weight_bits <= 15): 2 bytes a weight in the checkpoint
            needs_int32 = float(lay.weight.abs().max()) >= 2**15
            out[f"{prefix}{i}.weight"] = lay.weight.to(torch.int32 if needs_int32 else torch.int16)
            out[f"{prefix}{i}.bias"] = lay.bias.to(torch.int64)
            out[f"{prefix}{i}.meta"] = torch.tensor(
                [lay.shift, lay.transposed, lay.stride, lay.padding, lay.output_padding, lay.leaky],
                dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str = "hyper_int.") -> IntegerSynthesis:
        layers = []
        i = 0
        while f"{prefix}{i}.weight" in t:
            shift, tr, stride, pad, opad, leaky = (int(v) for v in t[f"{prefix}{i}.meta"].tolist())
            layers.append(IntLayer(t[f"{prefix}{i}.weight"].double(), t[f"{prefix}{i}.bias"].double(),
                                   shift, bool(tr), stride, pad, opad, bool(leaky)))
            i += 1
        if not layers:
            raise EntropyCodingError("no integer hyper-synthesis in these tensors")
        return cls(layers)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


class HyperpriorCodec(FactorizedCodec):
    config: HyperCodecConfig
    stream_name = NAME

    def __init__(self, config: HyperCodecConfig = HyperCodecConfig()) -> None:
        super().__init__(config)
        m, nh, nq = config.latent_channels, config.hyper_channels, config.num_qualities
        mid = config.hyper_mid or m * 3 // 2
        # The factorized density now models the side latent w (one group per quality).
        self.density = FactorizedDensity(nh, groups=nq, filters=config.filters)
        self.h_a = nn.Sequential(
            nn.Conv2d(m, nh, 3, padding=1), nn.LeakyReLU(SLOPE),
            _conv(nh, nh, 5), nn.LeakyReLU(SLOPE), _conv(nh, nh, 5),
        )
        self.h_s = nn.Sequential(
            _deconv(nh, m, 5), nn.LeakyReLU(SLOPE),
            _deconv(m, mid, 5), nn.LeakyReLU(SLOPE), nn.Conv2d(mid, 2 * m, 3, padding=1),
        )
        self._init_transforms()
        last = self.h_s[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        with torch.no_grad():  # start from near-constant predictions: mean 0, scale e
            last.weight.mul_(0.1)
            last.bias[:m].zero_()
            last.bias[m:].fill_(1.0)
        self.gauss: EntropyTables | None = None
        self.int_hs: IntegerSynthesis | None = None
        self.thresholds: np.ndarray | None = None  # int64 (scale_levels - 1,)

    @property
    def table_channels(self) -> int:
        return self.config.hyper_channels

    # ---------------------------------------------------------------- training
    def _mean_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-scale) halves of a (N, 2M, h, w) parameter tensor, log-scale capped."""
        mean, log_scale = params.chunk(2, dim=1)
        return mean, log_scale.clamp(max=math.log(self.config.scale_max) + 1)

    def _latent(self, z: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(rate input, decoder input, mean, log-scale) of the latent ``z`` given ``h_s``'s
        output ``params``: here every element is coded with its hyperprior parameters."""
        mean, log_scale = self._mean_scale(params)
        z_rate, z_hat = quantize(z, mean, self.training)
        return z_rate, z_hat, mean, log_scale

    def forward(self, x: torch.Tensor, quality: int | torch.Tensor) -> dict[str, Any]:
        """As :meth:`FactorizedCodec.forward`; likelihoods ``y`` (the latent, Gaussian) and
        ``z`` (the side latent, factorized)."""
        q = self._quality_index(quality, x.shape[0])
        z = self.analysis(x) * torch.exp(self.log_gain[q])[:, :, None, None]
        w = self.h_a(pad_to_multiple(z, HYPER_FACTOR))
        med = self.density.medians().to(w.device)[q][:, :, None, None]
        w_rate, w_hat = quantize(w, med, self.training)
        lik_w = self.density.likelihood(w_rate, q)
        # h_s reads the integer symbols round(w - median), as the integer network will
        params = self.h_s(w_hat - med)[:, :, : z.shape[-2], : z.shape[-1]]
        z_rate, z_hat, mean, log_scale = self._latent(z, params)
        lik_z = gaussian_likelihood(z_rate - mean, torch.exp(log_scale), self.config.scale_min)
        y_hat = z_hat * torch.exp(self.log_inv_gain[q])[:, :, None, None]
        return {"x_hat": self.synthesis(y_hat, q), "likelihoods": {"y": lik_z, "z": lik_w}}

    # ---------------------------------------------------------------- coding
    def update_tables(self) -> EntropyTables:
        c = self.config
        self.tables = build_tables(self.density, c.tail_mass, c.max_half_range, c.precision)
        scales = scale_table(c.scale_min, c.scale_max, c.scale_levels)
        self.gauss = build_gaussian_tables(scales, c.tail_mass, c.max_half_range, c.precision)
        self.int_hs = IntegerSynthesis.from_float(self.h_s, c.frac_bits, c.weight_bits)
        # Nearest table scale in log: thresholds at the log-midpoints, in fixed point.
        mids = (np.log(scales[1:]) + np.log(scales[:-1])) / 2
        self.thresholds = np.round(mids * 2.0**c.frac_bits).astype(np.int64)
        return self.tables

    def coding_tensors(self, integer_networks: bool = True) -> dict[str, torch.Tensor]:
        """``integer_networks=False`` leaves out the integer hyper-synthesis (releases: it is
        rebuilt exactly from the stored float weights on load, see IntegerSynthesis)."""
        if self.tables is None or self.gauss is None or self.int_hs is None or self.thresholds is None:
            raise RuntimeError("no coding tables: call update_tables() first")
        return {
            **self.tables.to_tensors("entropy."),
            **self.gauss.to_tensors("gauss."),
            **(self.int_hs.to_tensors("hyper_int.") if integer_networks else {}),
            "hyper_int.thresholds": torch.from_numpy(self.thresholds.copy()),
        }

    def _integer_network(self, tensors: dict[str, torch.Tensor], prefix: str, net: nn.Sequential,
                         in_frac_bits: int = 0) -> IntegerSynthesis:
        """The stored integer copy of ``net``, else one rebuilt from its (loaded) float weights."""
        if f"{prefix}0.weight" in tensors:
            return IntegerSynthesis.from_tensors(tensors, prefix)
        c = self.config
        return IntegerSynthesis.from_float(net, c.frac_bits, c.weight_bits, in_frac_bits)

    def load_coding_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        c = self.config
        super().load_coding_tensors(tensors)
        self.gauss = EntropyTables.from_tensors(tensors, "gauss.")
        self.int_hs = self._integer_network(tensors, "hyper_int.", self.h_s)
        if "hyper_int.thresholds" not in tensors:
            raise EntropyCodingError("no scale thresholds in these tensors")
        self.thresholds = tensors["hyper_int.thresholds"].numpy().astype(np.int64)
        if self.gauss.rows != c.scale_levels or self.thresholds.shape != (c.scale_levels - 1,):
            raise EntropyCodingError(
                f"Gaussian tables have {self.gauss.rows} rows and {self.thresholds.size} "
                f"thresholds, expected {c.scale_levels} and {c.scale_levels - 1}")

    def _int_params(self, w_sym: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """The integer hyper-synthesis' output (2M, h, w) for the side symbols: float64
        integers in units of 2**-frac_bits, identical in encoder and decoder on any machine."""
        if self.int_hs is None or self.thresholds is None or self.gauss is None:
            raise RuntimeError("no coding tables: load a codec checkpoint or call update_tables()")
        return self.int_hs(w_sym)[:, : size[0], : size[1]]

    def _split(self, params: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """(mean float32 (M, h, w), table index int64 (M, h, w)) from integer parameters: the
        index is an integer comparison of the fixed-point log-scale with the thresholds."""
        assert self.thresholds is not None
        m, fb = self.config.latent_channels, self.config.frac_bits
        mean = (params[:m] / 2.0**fb).float()  # exact: |params| <= 2**24
        index = np.searchsorted(self.thresholds, params[m:].numpy().astype(np.int64), side="right")
        return mean, index

    def _encode_latent(self, z: torch.Tensor, params: torch.Tensor) -> bytes:
        """The main stream of the gained latent ``z`` (M, h, w) given the integer parameters."""
        assert self.gauss is not None
        mean, index = self._split(params)
        return encode_rows(to_symbols(z, mean).reshape(-1), index.reshape(-1), self.gauss)

    def _decode_latent(self, data: bytes, params: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """Inverse of :meth:`_encode_latent`: the dequantized gained latent (M, h, w)."""
        assert self.gauss is not None
        mean, index = self._split(params)
        sym = decode_rows(data, index.reshape(-1), self.gauss).reshape(shape)
        return torch.from_numpy(sym).float() + mean

    @torch.inference_mode()
    def compress(self, img: np.ndarray, quality: int, sha256: str = "",
                 analysed: Analysed | None = None) -> bytes:
        quality = self._check_quality(quality)
        rows = self._rows(quality)
        y, pb, pr, _ = self._analysed(img, analysed)
        z = y * torch.exp(self.log_gain[quality - 1])[None, :, None, None]
        w = self.h_a(pad_to_multiple(z, HYPER_FACTOR))[0]
        w_sym = to_symbols(w, torch.from_numpy(rows.medians)[:, None, None])
        side = encode_symbols(w_sym, rows)
        z = z[0]
        main = self._encode_latent(z, self._int_params(w_sym, (z.shape[1], z.shape[2])))
        return self._pack(img, quality, sha256, pb, pr, z.shape, _LEN.pack(len(side)) + side + main)

    @torch.inference_mode()
    def decompress(self, data: bytes, sha256: str | None = None) -> np.ndarray:
        header, payload = self.parse(data, sha256)
        rows = self._rows(header.quality)
        side, main = split_payload(payload, "side information")
        m, h, w = header.latent_shape
        hyper_shape = (self.config.hyper_channels, -(-h // HYPER_FACTOR), -(-w // HYPER_FACTOR))
        try:
            w_sym = decode_symbols(side, rows, hyper_shape)
            z_hat = self._decode_latent(main, self._int_params(w_sym, (h, w)), (m, h, w))
        except EntropyCodingError as e:
            raise bitstream.BitstreamError(f"corrupted stream: {e}") from e
        return self._synthesize(z_hat, header)


def split_payload(payload: bytes, what: str) -> tuple[bytes, bytes]:
    """(first, rest) of a payload that starts with a 4-byte length of its first part."""
    if len(payload) < _LEN.size:
        raise bitstream.BitstreamError(f"corrupted stream: no length of the {what}")
    (n,) = _LEN.unpack_from(payload)
    if _LEN.size + n > len(payload):
        raise bitstream.BitstreamError(
            f"corrupted stream: {what} of {n} bytes in a payload of {len(payload)}")
    return payload[_LEN.size : _LEN.size + n], payload[_LEN.size + n :]


def register_all(register: Any, entry_cls: Any) -> None:
    register(
        entry_cls(
            name=NAME,
            kind="codec",
            config_cls=HyperCodecConfig,
            factory=HyperpriorCodec,
            presets={
                "tiny": {"channels": 8, "latent_channels": 8, "hyper_channels": 8, "filters": (3,),
                         "scale_levels": 16},
                "small": {"channels": 64, "latent_channels": 96, "hyper_channels": 64},
                # small with twice the latent channels (the high-rate bottleneck), h_s as small's:
                # widened from a trained small model by --init-from
                "wide": {"channels": 64, "latent_channels": 192, "hyper_channels": 64,
                         "hyper_mid": 144},
                "base": {"channels": 128, "latent_channels": 192, "hyper_channels": 128},
            },
        )
    )
