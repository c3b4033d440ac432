"""Factorized entropy model (training) and exact integer-table entropy coding (coding).

Training side: :class:`FactorizedDensity` is the per-channel learned cumulative density of Ballé
et al. 2018 (appendix 6.1; CompressAI's ``EntropyBottleneck``): a tiny monotone MLP per channel
whose output is the logit of the CDF. It holds ``groups`` independent sets of channels, one per
quality level of a variable-rate codec, and evaluates the likelihood of noisy latents.

Coding side: floats computed by a network may differ in the last bit between machines, and an
entropy coder whose encoder and decoder disagree by one unit of probability produces garbage.
So the density is turned ONCE (at the end of training) into integer tables —
:class:`EntropyTables`, per row (quality, channel): ``lengths[r]`` in-range symbols plus one
escape symbol, with a ``precision``-bit CDF — that are stored with the checkpoint. Encoding and
decoding only ever read those integers.

How the integers reach constriction exactly (constriction 0.5.0, checked against its source,
``src/stream/model/categorical.rs::fast_quantized_cdf`` and the Python binding of
``stream.model.Categorical``): a concrete ``Categorical(p, perfect=False)`` casts ``p`` to f64
and builds a 24-bit contiguous model whose left CDF values are
``floor(cumsum(p)[i-1] * scale) + i`` with ``scale = (2**24 - K) / sum(p)``. We pass
``p[i] = f[i] * 2**(24 - precision) - 1`` where ``f`` are our integer frequencies (all >= 1,
summing to ``2**precision``). Every ``p[i]`` and every partial sum is an integer below 2**53,
so they are exact in f64; ``sum(p) == 2**24 - K`` exactly, so ``scale == 1.0`` exactly and the
product is exact too. The model constriction builds therefore has left CDF values
``cdf[i] * 2**(24 - precision)``: exactly our integer table, with no float rounding anywhere,
on any machine. (``perfect=True`` would run an optimiser over the probabilities and move them;
``perfect=False`` is also passed explicitly because the default is announced to change.)

Out-of-range values are not clamped: the escape symbol (index ``lengths[r]``) is coded in the
table, and the value itself is appended to the same range-coded stream afterwards as an order-0
Exp-Golomb code of its zigzagged distance from the table's range, whose prefix length and
mantissa bits use constriction's integer-only ``Uniform`` model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import constriction
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# constriction's Default* models use 24-bit fixed point probabilities.
CONSTRICTION_PRECISION = 24
DEFAULT_PRECISION = 16
# Escaped values: |distance from the table range| < 2**MAX_ESCAPE_BITS.
MAX_ESCAPE_BITS = 22
_MAX_UNIFORM_BITS = 12  # mantissa bits are coded in chunks of at most this many bits


class EntropyCodingError(ValueError):
    """Symbols or tables that cannot be coded, or a stream that does not decode."""


# --------------------------------------------------------------------------------------------
# training side
# --------------------------------------------------------------------------------------------


class _LowerBound(torch.autograd.Function):
    """max(x, bound) whose gradient still flows where it would push x up (CompressAI)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bound: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp_min(bound)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        pass_through = (x >= ctx.bound) | (grad < 0)
        return grad * pass_through.to(grad.dtype), None


def lower_bound(x: torch.Tensor, bound: float) -> torch.Tensor:
    return _LowerBound.apply(x, bound)


class FactorizedDensity(nn.Module):
    """Learned univariate densities, one per (group, channel): c(x) = sigmoid(MLP(x)).

    Each MLP maps a scalar to a scalar through layers of widths ``filters``; weights are
    softplus-reparametrised (positive) and each hidden layer adds ``tanh(a) * tanh(h)`` with
    ``|tanh(a)| < 1``, so the CDF logit is strictly increasing in x.
    """

    def __init__(
        self,
        channels: int,
        groups: int = 1,
        filters: Sequence[int] = (3, 3, 3),
        init_scale: float = 10.0,
        likelihood_bound: float = 1e-9,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.groups = groups
        self.likelihood_bound = likelihood_bound
        dims = (1, *filters, 1)
        scale = init_scale ** (1 / (len(dims) - 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(dims) - 1):
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            shape = (groups, channels, dims[i + 1], dims[i])
            self.matrices.append(nn.Parameter(torch.full(shape, init)))
            self.biases.append(nn.Parameter(torch.rand(groups, channels, dims[i + 1], 1) - 0.5))
            if i < len(dims) - 2:
                self.factors.append(nn.Parameter(torch.zeros(groups, channels, dims[i + 1], 1)))

    def logits_cdf(self, x: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        """CDF logits. x: (B, C, 1, P); group: (B,) 0-based group per row of x, or None when
        B == groups (row b uses group b)."""
        h = x
        for i, (m, b) in enumerate(zip(self.matrices, self.biases, strict=True)):
            if group is not None:
                m, b = m[group], b[group]
            h = torch.matmul(F.softplus(m.to(h.dtype)), h) + b.to(h.dtype)
            if i < len(self.factors):
                a = self.factors[i] if group is None else self.factors[i][group]
                h = h + torch.tanh(a.to(h.dtype)) * torch.tanh(h)
        return h

    def likelihood(self, z: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """P(z - 0.5 < Z < z + 0.5) for z (N, C, H, W) under the densities of ``group`` (N,)."""
        n, c, h, w = z.shape
        v = z.reshape(n, c, 1, h * w)
        lower = self.logits_cdf(v - 0.5, group)
        upper = self.logits_cdf(v + 0.5, group)
        # Evaluate in the tail where the sigmoid is most accurate (CompressAI's sign trick).
        sign = -torch.sign(lower + upper).detach()
        lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        return lower_bound(lik, self.likelihood_bound).reshape(n, c, h, w)

    @torch.no_grad()
    def quantiles(self, target: float, iters: int = 60, span: float = 4096.0) -> torch.Tensor:
        """x with CDF(x) == target for every (group, channel), by bisection: (groups, C)."""
        logit = math.log(target / (1 - target))
        g, c = self.groups, self.channels
        lo = torch.full((g, c, 1, 1), -span, dtype=torch.float64)
        hi = torch.full((g, c, 1, 1), span, dtype=torch.float64)
        for _ in range(iters):
            mid = (lo + hi) / 2
            above = self.logits_cdf(mid) > logit
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
        return ((lo + hi) / 2).reshape(g, c)

    def medians(self) -> torch.Tensor:
        return self.quantiles(0.5, iters=40).float()

    @torch.no_grad()
    def pmf(self, centers: torch.Tensor) -> torch.Tensor:
        """P(|Z - centers| < 0.5) in float64; centers: (groups, C, P)."""
        g, c, p = centers.shape
        v = centers.to(torch.float64).reshape(g, c, 1, p)
        lower = self.logits_cdf(v - 0.5)
        upper = self.logits_cdf(v + 0.5)
        sign = -torch.sign(lower + upper)
        return torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).reshape(g, c, p)


# --------------------------------------------------------------------------------------------
# integer tables
# --------------------------------------------------------------------------------------------


def quantize_pmf(pmf: np.ndarray, precision: int = DEFAULT_PRECISION) -> np.ndarray:
    """Integer frequencies (int64) >= 1 summing to 2**precision, close to ``pmf``."""
    pmf = np.asarray(pmf, dtype=np.float64)
    total = 1 << precision
    n = pmf.size
    if n < 2 or n > total:
        raise EntropyCodingError(f"cannot quantize a pmf of {n} symbols to {precision} bits")
    if not np.all(np.isfinite(pmf)) or np.any(pmf < 0) or pmf.sum() <= 0:
        raise EntropyCodingError("pmf must be finite, non-negative and not all zero")
    p = pmf / pmf.sum()
    f = np.maximum(1, np.round(p * total)).astype(np.int64)
    diff = total - int(f.sum())
    if diff > 0:
        f[int(np.argmax(p))] += diff
    elif diff < 0:
        # Take the excess from the largest frequencies, never going below 1.
        need = -diff
        for i in np.argsort(-f, kind="stable"):
            take = min(need, int(f[i]) - 1)
            f[i] -= take
            need -= take
            if need == 0:
                break
    assert int(f.sum()) == total and f.min() >= 1
    return f


@dataclass(eq=False)
class EntropyTables:
    """Integer coding tables, one row per (quality, channel) (or per channel).

    Row r codes values ``offsets[r] .. offsets[r] + lengths[r] - 1`` as symbols
    ``0 .. lengths[r] - 1`` and everything else as the escape symbol ``lengths[r]``.
    ``cdf[r, :lengths[r] + 2]`` is strictly increasing from 0 to ``2**precision``; the rest of
    the row is padding (``2**precision``). ``medians`` (float32) are the dequantization
    offsets of the latents (symbols are ``round(z - median)``); they are not used for coding.
    """

    cdf: np.ndarray  # int32 (R, Lmax + 2)
    lengths: np.ndarray  # int32 (R,)
    offsets: np.ndarray  # int32 (R,)
    precision: int = DEFAULT_PRECISION
    medians: np.ndarray = None  # type: ignore[assignment]  # float32 (R,); zeros when not given
    _models: dict[int, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.cdf = np.ascontiguousarray(self.cdf, dtype=np.int32)
        self.lengths = np.ascontiguousarray(self.lengths, dtype=np.int32).reshape(-1)
        self.offsets = np.ascontiguousarray(self.offsets, dtype=np.int32).reshape(-1)
        if self.medians is None:
            self.medians = np.zeros(len(self.lengths), np.float32)
        self.medians = np.ascontiguousarray(self.medians, dtype=np.float32).reshape(-1)
        self.validate()

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    def validate(self) -> None:
        p = int(self.precision)
        if not 1 <= p <= CONSTRICTION_PRECISION:
            raise EntropyCodingError(f"table precision {p} not in 1..{CONSTRICTION_PRECISION}")
        if self.cdf.ndim != 2 or self.cdf.shape[0] != self.rows:
            raise EntropyCodingError(f"cdf shape {self.cdf.shape} does not match {self.rows} rows")
        if self.offsets.shape != self.lengths.shape or self.medians.shape != self.lengths.shape:
            raise EntropyCodingError("offsets/medians do not match lengths")
        if self.rows and (self.lengths.min() < 1 or self.lengths.max() + 2 > self.cdf.shape[1]):
            raise EntropyCodingError("table lengths out of range")
        total = 1 << p
        for r in range(self.rows):
            row = self.cdf[r, : self.lengths[r] + 2].astype(np.int64)
            if row[0] != 0 or row[-1] != total or np.any(np.diff(row) < 1):
                raise EntropyCodingError(f"table row {r} is not a {p}-bit CDF with non-zero steps")

    def select(self, start: int, stop: int) -> EntropyTables:
        """Rows ``start:stop`` (e.g. the channels of one quality level)."""
        if not 0 <= start < stop <= self.rows:
            raise EntropyCodingError(f"rows {start}:{stop} outside 0:{self.rows}")
        return EntropyTables(
            self.cdf[start:stop], self.lengths[start:stop], self.offsets[start:stop],
            self.precision, self.medians[start:stop],
        )

    @classmethod
    def from_pmfs(
        cls,
        pmfs: Sequence[np.ndarray],
        offsets: Sequence[int],
        precision: int = DEFAULT_PRECISION,
        medians: np.ndarray | None = None,
    ) -> EntropyTables:
        """Tables from per-row pmfs over the in-range symbols followed by the escape mass."""
        freqs = [quantize_pmf(p, precision) for p in pmfs]
        width = max(len(f) for f in freqs) + 1
        cdf = np.full((len(freqs), width), 1 << precision, np.int64)
        for r, f in enumerate(freqs):
            cdf[r, 0] = 0
            cdf[r, 1 : len(f) + 1] = np.cumsum(f)
        lengths = np.array([len(f) - 1 for f in freqs])
        return cls(cdf, lengths, np.asarray(offsets), precision, medians)  # type: ignore[arg-type]

    def to_tensors(self, prefix: str = "entropy.") -> dict[str, torch.Tensor]:
        return {
            f"{prefix}cdf": torch.from_numpy(self.cdf.copy()),
            f"{prefix}lengths": torch.from_numpy(self.lengths.copy()),
            f"{prefix}offsets": torch.from_numpy(self.offsets.copy()),
            f"{prefix}medians": torch.from_numpy(self.medians.copy()),
            f"{prefix}precision": torch.tensor([self.precision], dtype=torch.int32),
        }

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], prefix: str = "entropy."
    ) -> EntropyTables:
        try:
            return cls(
                cdf=tensors[f"{prefix}cdf"].numpy(),
                lengths=tensors[f"{prefix}lengths"].numpy(),
                offsets=tensors[f"{prefix}offsets"].numpy(),
                precision=int(tensors[f"{prefix}precision"].reshape(-1)[0]),
                medians=tensors[f"{prefix}medians"].float().numpy(),
            )
        except KeyError as e:
            raise EntropyCodingError(f"no entropy tables in these tensors (missing {e})") from None

    def model(self, r: int) -> Any:
        """constriction model of row r (cached); see the module docstring for exactness."""
        m = self._models.get(r)
        if m is None:
            freq = np.diff(self.cdf[r, : self.lengths[r] + 2].astype(np.int64))
            shift = CONSTRICTION_PRECISION - int(self.precision)
            p = (freq * (1 << shift) - 1).astype(np.float64)
            m = constriction.stream.model.Categorical(p, perfect=False)
            self._models[r] = m
        return m


def build_tables(
    density: FactorizedDensity,
    tail_mass: float = 1e-9,
    max_half_range: int = 1024,
    precision: int = DEFAULT_PRECISION,
) -> EntropyTables:
    """Integer tables for all (group, channel) rows of a trained density, row = g * C + c.

    Symbols are ``round(z - median)``; the in-range interval covers all but ``tail_mass`` of
    the density (capped at ``max_half_range`` around the median); the escape symbol gets the
    mass outside it (at least one unit).
    """
    g, c = density.groups, density.channels
    med = density.quantiles(0.5)
    lo_q = density.quantiles(tail_mass / 2)
    hi_q = density.quantiles(1 - tail_mass / 2)
    lo = torch.floor(lo_q - med).clamp(-max_half_range, 0).long()
    hi = torch.ceil(hi_q - med).clamp(0, max_half_range).long()
    lengths = (hi - lo + 1).reshape(-1)
    lmax = int(lengths.max())
    k = torch.arange(lmax, dtype=torch.float64)
    centers = med.unsqueeze(-1) + lo.unsqueeze(-1).to(torch.float64) + k  # (g, c, lmax)
    pmf = density.pmf(centers).reshape(g * c, lmax).numpy()
    lo_flat = lo.reshape(-1).numpy()
    pmfs = []
    for r in range(g * c):
        n = int(lengths[r])
        p = pmf[r, :n]
        escape = max(0.0, 1.0 - float(p.sum()))
        pmfs.append(np.concatenate([p, [escape]]))
    return EntropyTables.from_pmfs(pmfs, [int(v) for v in lo_flat], precision, med.reshape(-1).float().numpy())


# --------------------------------------------------------------------------------------------
# coding
# --------------------------------------------------------------------------------------------


def _zigzag(r: np.ndarray) -> np.ndarray:
    return np.where(r >= 0, 2 * r, -2 * r - 1)


def _unzigzag(u: np.ndarray) -> np.ndarray:
    return np.where(u % 2 == 0, u // 2, -(u + 1) // 2)


def _uniform(bits: int) -> Any:
    return constriction.stream.model.Uniform(1 << bits)


def encode_symbols(symbols: np.ndarray, tables: EntropyTables) -> bytes:
    """Range-code integer values ``symbols`` (C, H, W) with row c of ``tables`` for channel c
    (see :func:`encode_rows`: the stream is that of row index ``c`` for every value of channel c).
    """
    s = np.asarray(symbols)
    if s.ndim != 3 or s.shape[0] != tables.rows:
        raise EntropyCodingError(f"symbols of shape {s.shape} for {tables.rows} table rows")
    return encode_rows(s.reshape(-1), _channel_rows(s.shape), tables)


def _channel_rows(shape: Sequence[int]) -> np.ndarray:
    c, h, w = (int(v) for v in shape)
    return np.repeat(np.arange(c, dtype=np.int64), h * w)


def encode_rows(values: np.ndarray, rows: np.ndarray, tables: EntropyTables) -> bytes:
    """Range-code integer ``values`` (1-D), value i with table row ``rows[i]``.

    Stream layout (one constriction ``RangeEncoder``, 32-bit little-endian words): for each
    table row in increasing order, the table symbols of the values coded with it (in their
    order); then, for every escaped value in order, the Exp-Golomb prefix length ``n`` (Uniform
    over 0..MAX_ESCAPE_BITS); then each one's ``n`` mantissa bits in chunks of at most 12 bits
    (Uniform). The decoder needs ``rows`` too: a factorized model's rows are the channels, a
    hyperprior's are computed from the side information (bit-exactly, on both sides).
    """
    v = np.asarray(values).reshape(-1).astype(np.int64)
    r_idx = np.asarray(rows).reshape(-1).astype(np.int64)
    if v.shape != r_idx.shape:
        raise EntropyCodingError(f"{v.size} values for {r_idx.size} row indices")
    if r_idx.size and (r_idx.min() < 0 or r_idx.max() >= tables.rows):
        raise EntropyCodingError(f"row indices outside 0..{tables.rows - 1}")
    enc = constriction.stream.queue.RangeEncoder()
    idx = v - tables.offsets[r_idx]
    length = tables.lengths[r_idx].astype(np.int64)
    inside = (idx >= 0) & (idx < length)
    coded = np.where(inside, idx, length).astype(np.int32)
    order, starts = _group_by_row(r_idx, tables.rows)
    for row in range(tables.rows):
        sel = order[starts[row] : starts[row + 1]]
        if sel.size:
            enc.encode(np.ascontiguousarray(coded[sel]), tables.model(row))
    if not inside.all():
        esc_idx = idx[~inside]
        esc_len = length[~inside]
        r = np.where(esc_idx < 0, esc_idx, esc_idx - esc_len)
        u = _zigzag(r) + 1  # >= 1
        if int(u.max()) >= 1 << MAX_ESCAPE_BITS:
            raise EntropyCodingError(
                f"value {int(v[~inside][np.argmax(u)])} is too far outside the coding table "
                f"(limit ±2**{MAX_ESCAPE_BITS - 1}): non-finite or exploding latents?"
            )
        nbits = np.array([x.bit_length() - 1 for x in u.tolist()], np.int32)
        enc.encode(nbits, constriction.stream.model.Uniform(MAX_ESCAPE_BITS + 1))
        for val, n in zip(u.tolist(), nbits.tolist(), strict=True):
            mant = val - (1 << n)
            while n > 0:
                b = min(n, _MAX_UNIFORM_BITS)
                n -= b
                enc.encode(np.array([(mant >> n) & ((1 << b) - 1)], np.int32), _uniform(b))
    return enc.get_compressed().astype("<u4").tobytes()


def _group_by_row(rows: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions sorted by row (stable: original order within a row) and each row's start."""
    order = np.argsort(rows, kind="stable")
    starts = np.searchsorted(rows[order], np.arange(n_rows + 1))
    return order, starts


def decode_symbols(data: bytes, tables: EntropyTables, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`encode_symbols`: int32 values of ``shape`` (C, H, W).

    Raises :class:`EntropyCodingError` (a ValueError) on a stream that cannot be decoded.
    """
    c, h, w = (int(v) for v in shape)
    if c != tables.rows or h < 0 or w < 0:
        raise EntropyCodingError(f"shape {tuple(shape)} does not match {tables.rows} table rows")
    return decode_rows(data, _channel_rows((c, h, w)), tables).reshape(c, h, w)


def decode_rows(data: bytes, rows: np.ndarray, tables: EntropyTables) -> np.ndarray:
    """Inverse of :func:`encode_rows`: the int32 values (1-D) coded with table rows ``rows``.

    Raises :class:`EntropyCodingError` (a ValueError) on a stream that cannot be decoded.
    """
    r_idx = np.asarray(rows).reshape(-1).astype(np.int64)
    if r_idx.size and (r_idx.min() < 0 or r_idx.max() >= tables.rows):
        raise EntropyCodingError(f"row indices outside 0..{tables.rows - 1}")
    if len(data) % 4:
        raise EntropyCodingError(f"entropy-coded payload of {len(data)} bytes is not whole words")
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    try:
        dec = constriction.stream.queue.RangeDecoder(words)
        out = np.empty(r_idx.size, np.int64)
        order, starts = _group_by_row(r_idx, tables.rows)
        for row in range(tables.rows):
            sel = order[starts[row] : starts[row + 1]]
            if sel.size:
                out[sel] = dec.decode(tables.model(row), sel.size)
        length = tables.lengths[r_idx].astype(np.int64)
        lo = tables.offsets[r_idx].astype(np.int64)
        escaped = out == length
        values = out + lo
        if escaped.any():
            count = int(escaped.sum())
            nbits = dec.decode(constriction.stream.model.Uniform(MAX_ESCAPE_BITS + 1), count)
            u = np.empty(count, np.int64)
            for i, n in enumerate(nbits.tolist()):
                mant = 0
                while n > 0:
                    b = min(n, _MAX_UNIFORM_BITS)
                    n -= b
                    mant = (mant << b) | int(dec.decode(_uniform(b)))
                u[i] = (1 << int(nbits[i])) + mant
            r = _unzigzag(u - 1)
            values[escaped] = np.where(r < 0, lo[escaped] + r, (lo + length)[escaped] + r)
    except EntropyCodingError:
        raise
    except Exception as e:  # constriction raises on streams that are not valid
        raise EntropyCodingError(f"entropy-coded payload does not decode: {e}") from e
    if np.abs(values).max(initial=0) >= 1 << 31:
        raise EntropyCodingError("decoded values out of range")
    return values.astype(np.int32)


# --------------------------------------------------------------------------------------------
# Gaussian conditional (hyperprior codecs)
# --------------------------------------------------------------------------------------------


def gaussian_likelihood(
    v: torch.Tensor, scale: torch.Tensor, scale_min: float = 0.11, bound: float = 1e-9
) -> torch.Tensor:
    """P(v - 0.5 < V < v + 0.5) for V ~ N(0, scale²), with scale bounded below (CompressAI's
    ``GaussianConditional``: evaluated on -|v|, where the normal CDF is most accurate)."""
    s = lower_bound(scale, scale_min)
    a = torch.abs(v)
    upper = 0.5 * torch.erfc(-(0.5 - a) / (s * math.sqrt(2)))
    lower = 0.5 * torch.erfc(-(-0.5 - a) / (s * math.sqrt(2)))
    return lower_bound(upper - lower, bound)


def scale_table(scale_min: float, scale_max: float, levels: int) -> np.ndarray:
    """Log-spaced coding scales (float64), one integer table row each."""
    if not 0 < scale_min < scale_max or levels < 2:
        raise ValueError(f"bad scale table {scale_min}..{scale_max} x{levels}")
    return np.exp(np.linspace(math.log(scale_min), math.log(scale_max), levels))


def build_gaussian_tables(
    scales: np.ndarray,
    tail_mass: float = 1e-9,
    max_half_range: int = 1024,
    precision: int = DEFAULT_PRECISION,
) -> EntropyTables:
    """Integer tables of the zero-mean discretized Gaussians N(0, s²), one row per scale:
    symbols ``-half .. half`` (``half`` covers all but ``tail_mass``), the rest escapes."""
    from scipy.special import ndtr, ndtri

    z = -float(ndtri(tail_mass / 2))
    pmfs, offsets = [], []
    for s in np.asarray(scales, np.float64):
        half = int(min(max_half_range, max(1, math.ceil(s * z))))
        k = np.arange(-half, half + 1, dtype=np.float64)
        # ndtr(-|x|) is accurate in both tails; the pmf is symmetric.
        a = np.abs(k)
        p = ndtr((0.5 - a) / s) - ndtr((-0.5 - a) / s)
        escape = max(0.0, 1.0 - float(p.sum()))
        pmfs.append(np.concatenate([p, [escape]]))
        offsets.append(-half)
    return EntropyTables.from_pmfs(pmfs, offsets, precision)
