"""Learned image codec: bmshj2018-factorized (Ballé et al. 2018, "factorized prior") made
variable-rate, plus the engine the pipeline uses to compress and decompress images.

Architecture (as CompressAI's ``FactorizedPrior``, sized for CPU by the presets):
analysis ``g_a`` = ``stages`` stride-2 5x5 convolutions with GDN between them, synthesis
``g_s`` = the mirror image with transposed convolutions and inverse GDN; downsampling factor
``2**stages`` (16). Latents are coded with a factorized (per-channel, i.i.d. over space)
learned density — no side information.

Variable rate with one model: quality q scales the latent by a learned per-channel gain
vector before rounding and by a separate learned inverse gain after it ("asymmetric gained"
units, Cui et al. 2021), and has its own factorized density (a few parameters per channel),
since one density cannot fit latents whose spread changes with the gain. One training run
covers all ``len(lambdas)`` rate points; ``quality`` 1..N, higher = more bits, as in
CompressAI.

Quantization: training uses additive uniform noise for the rate term and straight-through
rounding around the channel medians for the decoder input ("mixed" quantization, Minnen &
Singh 2020); coding uses ``round(z - median)`` symbols with integer tables stored with the
checkpoint (see ``models/entropy.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import avif, bitstream
from models.entropy import (
    DEFAULT_PRECISION,
    EntropyCodingError,
    EntropyTables,
    FactorizedDensity,
    build_tables,
    decode_symbols,
    encode_symbols,
    lower_bound,
)
from models.metrics import psnr_uint8

NAME = "factorized-codec"
# CompressAI's bmshj2018 λ ladder (loss = λ·255²·MSE + bpp, x in [0, 1]), its qualities 2..7:
# on Kodak its 1..6 span 0.12–0.97 bpp; the photos here are smoother (downsampled from large
# originals) and need fewer bits at a given λ, so the ladder is shifted up one step to cover
# about 0.2–1.2 bpp.
DEFAULT_LAMBDAS = (0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932)


@dataclass(frozen=True)
class CodecConfig:
    channels: int = 128  # N: hidden channels of g_a / g_s
    latent_channels: int = 192  # M: channels of the coded latent y
    stages: int = 4  # stride-2 stages: downsampling factor 2**stages
    kernel: int = 5
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS  # one rate point per quality, increasing
    default_quality: int = 4
    init_gain: float = 10.0  # latent gain of the highest quality at initialisation
    filters: tuple[int, ...] = (3, 3, 3)  # hidden widths of the per-channel density MLP
    tail_mass: float = 1e-9  # coding tables cover all but this mass; the rest escapes
    max_half_range: int = 1024
    precision: int = DEFAULT_PRECISION  # bits of the integer CDF tables
    post_channels: int = 0  # decoder post-filter width (0: none; see PostFilter)
    post_layers: int = 3

    @property
    def num_qualities(self) -> int:
        return len(self.lambdas)

    @property
    def multiple(self) -> int:
        return 2**self.stages

    def __post_init__(self) -> None:
        if self.stages < 1 or self.channels < 1 or self.latent_channels < 1:
            raise ValueError("stages, channels and latent_channels must be positive")
        if self.post_channels < 0 or self.post_layers < 2:
            raise ValueError("post_channels must be >= 0 and post_layers >= 2")
        lam = self.lambdas
        if not lam or any(b <= a for a, b in zip(lam, lam[1:], strict=False)):
            raise ValueError(f"lambdas must be non-empty and increasing: {self.lambdas}")
        if not 1 <= self.default_quality <= len(self.lambdas):
            raise ValueError(f"default_quality {self.default_quality} not in 1..{len(lam)}")


class GDN(nn.Module):
    """Generalized divisive normalization (Ballé et al. 2016):
    ``y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)``; ``inverse=True`` multiplies instead.

    beta and gamma are kept non-negative by the reparametrization
    ``p = max(v, bound)**2 - pedestal`` (with a gradient that still pushes values up from the
    bound), as in CompressAI.
    """

    def __init__(
        self, channels: int, inverse: bool = False, beta_min: float = 1e-6,
        gamma_init: float = 0.1, reparam_offset: float = 2**-18,
    ) -> None:
        super().__init__()
        self.inverse = inverse
        self.pedestal = reparam_offset**2
        self.beta_bound = (beta_min + self.pedestal) ** 0.5
        self.gamma_bound = reparam_offset
        self.beta = nn.Parameter(torch.sqrt(torch.ones(channels) + self.pedestal))
        gamma = gamma_init * torch.eye(channels)
        self.gamma = nn.Parameter(torch.sqrt(gamma + self.pedestal))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = lower_bound(self.beta, self.beta_bound) ** 2 - self.pedestal
        gamma = lower_bound(self.gamma, self.gamma_bound) ** 2 - self.pedestal
        c = gamma.shape[0]
        norm = F.conv2d(x * x, gamma.reshape(c, c, 1, 1), beta)
        return x * (torch.sqrt(norm) if self.inverse else torch.rsqrt(norm))


class PostFilter(nn.Module):
    """Decoder-side enhancement of the synthesis output: a small residual CNN run at half
    resolution on the pixel-unshuffled image (2x2 blocks as 12 channels: 4x fewer positions
    for the same receptive field), with per-quality feature scales and shifts after its first
    layer (the synthesis' errors grow as the rate falls). Its last layer starts at zero: a
    fresh filter is the identity, so it can be added to a trained codec and trained alone."""

    def __init__(self, channels: int, layers: int, qualities: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(12, channels, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(qualities, channels))
        self.shift = nn.Parameter(torch.zeros(qualities, channels))
        body: list[nn.Module] = [nn.LeakyReLU(0.125)]
        for _ in range(layers - 2):
            body += [nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.125)]
        self.body = nn.Sequential(*body)
        self.out = nn.Conv2d(channels, 12, 3, padding=1)
        for conv in (self.inp, *self.body, self.out):
            if isinstance(conv, nn.Conv2d):
                nn.init.normal_(conv.weight, std=(conv.in_channels * 9) ** -0.5)
                nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
        nn.init.zeros_(self.out.weight)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) with even H, W; q: (N,) quality indices 0..Q-1."""
        h = self.inp(F.pixel_unshuffle(x - 0.5, 2))
        h = h * self.scale[q][:, :, None, None] + self.shift[q][:, :, None, None]
        return x + F.pixel_shuffle(self.out(self.body(h)), 2)


class Analysed(NamedTuple):
    """``g_a``'s output for one image: y (1, M, h, w) and the padding that made it."""

    y: torch.Tensor
    pad_bottom: int
    pad_right: int
    size: tuple[int, int]  # (height, width) of the image it was made from


def quantize(v: torch.Tensor, offset: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of the rate term, input of the decoder) for latents ``v`` rounded around
    ``offset``. Training: additive uniform noise for the rate, straight-through rounding for the
    decoder ("mixed" quantization, Minnen & Singh 2020); otherwise the rounded values for both."""
    rounded = torch.round(v - offset) + offset
    if training:
        return v + torch.empty_like(v).uniform_(-0.5, 0.5), v + (rounded - v).detach()
    return rounded, rounded


def pad_to_multiple(x: torch.Tensor, mult: int) -> torch.Tensor:
    """Replicate-pad the bottom and right of (N, C, H, W) ``x`` to multiples of ``mult``."""
    pb, pr = (-x.shape[-2]) % mult, (-x.shape[-1]) % mult
    return F.pad(x, (0, pr, 0, pb), mode="replicate") if pb or pr else x


def to_symbols(v: torch.Tensor, offset: torch.Tensor) -> np.ndarray:
    """int32 coding symbols ``round(v - offset)`` (non-finite latents refused, not coded)."""
    sym = torch.round(v - offset)
    if not torch.isfinite(sym).all():
        raise EntropyCodingError("non-finite latents")
    return sym.clamp(-(2**30), 2**30).to(torch.int32).numpy()


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=2, padding=k // 2)


def _deconv(cin: int, cout: int, k: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, k, stride=2, padding=k // 2, output_padding=1)


class FactorizedCodec(nn.Module):
    stream_name = NAME  # the model name written into (and required from) stream headers

    def __init__(self, config: CodecConfig = CodecConfig()) -> None:
        super().__init__()
        self.config = config
        n, m, k, s = config.channels, config.latent_channels, config.kernel, config.stages
        enc: list[nn.Module] = []
        dec: list[nn.Module] = []
        for i in range(s):
            enc.append(_conv(3 if i == 0 else n, m if i == s - 1 else n, k))
            dec.append(_deconv(m if i == 0 else n, 3 if i == s - 1 else n, k))
            if i < s - 1:
                enc.append(GDN(n))
                dec.append(GDN(n, inverse=True))
        self.g_a = nn.Sequential(*enc)
        self.g_s = nn.Sequential(*dec)
        self._init_transforms()
        self.post = (PostFilter(config.post_channels, config.post_layers, config.num_qualities)
                     if config.post_channels else None)
        lam = torch.tensor(config.lambdas, dtype=torch.float32)
        # Uniform quantization: distortion ~ step**2 and optimal step**2 ~ 1/λ, so gain ~ sqrt(λ).
        # The untrained g_a outputs values of about 0.1: start with gains that make the top
        # quality's latents span a few quantization steps.
        log_gain = (math.log(config.init_gain) + 0.5 * torch.log(lam / lam.max()))
        log_gain = log_gain[:, None].repeat(1, m)
        self.log_gain = nn.Parameter(log_gain)
        self.log_inv_gain = nn.Parameter(-log_gain.clone())
        self.density = FactorizedDensity(m, groups=config.num_qualities, filters=config.filters)
        self.tables: EntropyTables | None = None  # integer coding tables (from the checkpoint)

    def _init_transforms(self) -> None:
        """Variance-preserving init (PyTorch's default shrinks activations ~1.7x per layer, and
        more for stride-2 transposed convolutions, which slows the start of training a lot):
        each output sums fan_in = Cin·k² taps (Cin·k²/4 for a stride-2 transposed conv)."""
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                fan_in: float = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
            elif isinstance(mod, nn.ConvTranspose2d):
                k = mod.kernel_size[0] * mod.kernel_size[1]
                fan_in = mod.in_channels * k / (mod.stride[0] * mod.stride[1])
            else:
                continue
            nn.init.normal_(mod.weight, std=math.sqrt(1.0 / fan_in))
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        last = self.g_s[-1]
        assert isinstance(last, nn.ConvTranspose2d)
        if last.bias is not None:
            nn.init.constant_(last.bias, 0.5)  # start at mid-grey rather than black

    # ---------------------------------------------------------------- training
    def _quality_index(self, quality: int | torch.Tensor, n: int) -> torch.Tensor:
        q = torch.as_tensor(quality, dtype=torch.long).reshape(-1)
        if q.numel() == 1:
            q = q.expand(n)
        if q.numel() != n:
            raise ValueError(f"{q.numel()} qualities for a batch of {n}")
        if q.min() < 1 or q.max() > self.config.num_qualities:
            raise ValueError(f"quality must be in 1..{self.config.num_qualities}")
        return q - 1

    def forward(self, x: torch.Tensor, quality: int | torch.Tensor) -> dict[str, Any]:
        """x: (N, 3, H, W) in [0, 1], H and W multiples of ``config.multiple``; quality: an int
        or (N,) ints in 1..num_qualities. Returns ``{"x_hat", "likelihoods": {"y"}}``."""
        q = self._quality_index(quality, x.shape[0])
        y = self.analysis(x)
        z = y * torch.exp(self.log_gain[q])[:, :, None, None]
        med = self.density.medians().to(z.device)[q][:, :, None, None]
        z_rate, z_hat = quantize(z, med, self.training)
        lik = self.density.likelihood(z_rate, q)
        y_hat = z_hat * torch.exp(self.log_inv_gain[q])[:, :, None, None]
        return {"x_hat": self.synthesis(y_hat, q), "likelihoods": {"y": lik}}

    def synthesis(self, y_hat: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """x_hat = g_s(y_hat), then the post-filter if the model has one (q: quality indices)."""
        x_hat = self.g_s(y_hat)
        return x_hat if self.post is None else self.post(x_hat, q)

    def analysis(self, x: torch.Tensor) -> torch.Tensor:
        """y = g_a(x - 0.5): centred inputs train markedly faster (the output layer's bias
        starts at 0.5)."""
        return self.g_a(x - 0.5)

    # ---------------------------------------------------------------- coding
    def update_tables(self) -> EntropyTables:
        """(Re)build the integer coding tables from the current density."""
        c = self.config
        self.tables = build_tables(self.density, c.tail_mass, c.max_half_range, c.precision)
        return self.tables

    @property
    def table_channels(self) -> int:
        """Channels coded with the per-quality factorized tables."""
        return self.config.latent_channels

    def coding_tensors(self, integer_networks: bool = True) -> dict[str, torch.Tensor]:  # noqa: ARG002
        """What the coder needs besides the weights, to store with a checkpoint."""
        if self.tables is None:
            raise RuntimeError("no entropy tables: call update_tables() first")
        return self.tables.to_tensors("entropy.")

    def load_coding_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install the integer coding state stored with a checkpoint (raises
        ``EntropyCodingError`` when it is missing or does not fit this model)."""
        tables = EntropyTables.from_tensors(tensors, "entropy.")
        expect = self.config.num_qualities * self.table_channels
        if tables.rows != expect:
            raise EntropyCodingError(f"entropy tables have {tables.rows} rows, expected {expect}")
        self.tables = tables

    def _rows(self, quality: int) -> EntropyTables:
        if self.tables is None:
            raise RuntimeError("no entropy tables: load a codec checkpoint or call update_tables()")
        m = self.table_channels
        return self.tables.select((quality - 1) * m, quality * m)

    def _check_quality(self, quality: int) -> int:
        if isinstance(quality, bool) or int(quality) != quality:
            raise ValueError(f"quality must be an integer, got {quality!r}")
        if not 1 <= quality <= self.config.num_qualities:
            raise ValueError(f"quality {quality} not in 1..{self.config.num_qualities}")
        return int(quality)

    def pad(self, img: np.ndarray) -> tuple[torch.Tensor, int, int]:
        """uint8 HxWx3 → (1, 3, H', W') float in [0, 1], replicate-padded to the multiple."""
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected a uint8 HxWx3 image, got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        if h < 1 or w < 1:
            raise ValueError(f"empty image {img.shape}")
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255
        x = pad_to_multiple(x, self.config.multiple)
        return x, x.shape[2] - h, x.shape[3] - w

    @torch.inference_mode()
    def analyse(self, img: np.ndarray) -> Analysed:
        """The analysis transform of ``img``, which does not depend on the quality: the
        per-quality gain comes after it, so one result serves :meth:`compress` at every rung
        (rate control tries several rungs of one image)."""
        x, pb, pr = self.pad(img)
        return Analysed(self.analysis(x), pb, pr, (img.shape[0], img.shape[1]))

    def _analysed(self, img: np.ndarray, analysed: Analysed | None) -> Analysed:
        if analysed is None:
            return self.analyse(img)
        if analysed.size != (img.shape[0], img.shape[1]):
            raise ValueError(f"analysis of a {analysed.size} image given for one of {img.shape[:2]}")
        return analysed

    @torch.inference_mode()
    def compress(self, img: np.ndarray, quality: int, sha256: str = "",
                 analysed: Analysed | None = None) -> bytes:
        """Encode a uint8 HxWx3 image at ``quality``; ``sha256`` identifies the checkpoint;
        ``analysed``: :meth:`analyse`'s result for ``img``, reused instead of recomputed."""
        quality = self._check_quality(quality)
        rows = self._rows(quality)
        y4, pb, pr, _ = self._analysed(img, analysed)
        y = y4[0]
        z = y * torch.exp(self.log_gain[quality - 1])[:, None, None]
        sym = to_symbols(z, torch.from_numpy(rows.medians)[:, None, None])
        return self._pack(img, quality, sha256, pb, pr, sym.shape, encode_symbols(sym, rows))

    def _pack(self, img: np.ndarray, quality: int, sha256: str, pb: int, pr: int,
              latent_shape: tuple[int, ...], payload: bytes) -> bytes:
        """The stream: this model's header for ``img``, then ``payload``."""
        header = bitstream.Header(
            model=self.stream_name, sha256_prefix=bitstream.Header.sha_prefix(sha256), quality=quality,
            width=img.shape[1], height=img.shape[0], pad_bottom=pb, pad_right=pr,
            latent_shape=tuple(latent_shape),  # type: ignore[arg-type]
        )
        return bitstream.pack(header, payload)

    def parse(self, data: bytes, sha256: str | None = None) -> tuple[bitstream.Header, bytes]:
        """Unpack and validate a stream against this model (and checkpoint, if given)."""
        header, payload = bitstream.unpack_for(data, self.stream_name, self.config.num_qualities, sha256)
        mult = self.config.multiple
        hp, wp = header.height + header.pad_bottom, header.width + header.pad_right
        expect = (self.config.latent_channels, hp // mult, wp // mult)
        if (hp % mult or wp % mult or header.pad_bottom >= mult or header.pad_right >= mult
                or header.latent_shape != expect):
            raise bitstream.BitstreamError(
                f"inconsistent header: image {header.width}x{header.height} padded by "
                f"{header.pad_right},{header.pad_bottom} with latent {header.latent_shape}")
        return header, payload

    @torch.inference_mode()
    def decompress(self, data: bytes, sha256: str | None = None) -> np.ndarray:
        """Decode a stream to a uint8 HxWx3 image (``sha256``: check the checkpoint id)."""
        header, payload = self.parse(data, sha256)
        rows = self._rows(header.quality)
        try:
            sym = decode_symbols(payload, rows, header.latent_shape)
        except EntropyCodingError as e:
            raise bitstream.BitstreamError(f"corrupted stream: {e}") from e
        z_hat = torch.from_numpy(sym).float() + torch.from_numpy(rows.medians)[:, None, None]
        return self._synthesize(z_hat, header)

    def _synthesize(self, z_hat: torch.Tensor, header: bitstream.Header) -> np.ndarray:
        """Dequantized gained latent (C, h, w) → the uint8 HxWx3 image of ``header``."""
        y_hat = z_hat * torch.exp(self.log_inv_gain[header.quality - 1])[:, None, None]
        # channels-last input: PyTorch's CPU transposed convolutions run ~2x faster in it
        y_hat = y_hat[None].contiguous(memory_format=torch.channels_last)
        q = torch.tensor([header.quality - 1])
        x_hat = self.synthesis(y_hat, q)[0, :, : header.height, : header.width]
        out = torch.round(x_hat.clamp(0, 1) * 255).to(torch.uint8)
        return out.permute(1, 2, 0).contiguous().numpy()


def macs_per_pixel(model: nn.Module, size: int = 64) -> dict[str, float]:
    """Multiply-adds per image pixel of the encoder and the decoder, counted from the
    convolutions and GDN layers of one forward pass on a ``size``x``size`` input (entropy
    coding not included). The encoder runs g_a (and a hyperprior's h_a and h_s, which it needs
    to pick the tables, and a context model's ctx and ep); the decoder runs g_s (and h_s, ctx,
    ep, and the post-filter)."""
    counts: dict[str, float] = {}
    hooks = []

    def hook(part: str) -> Any:
        def fn(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            n = 0
            if isinstance(mod, nn.Conv2d):
                n = out.numel() * mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            elif isinstance(mod, nn.ConvTranspose2d):
                n = inp[0].numel() * mod.kernel_size[0] * mod.kernel_size[1] * mod.out_channels // mod.groups
            elif isinstance(mod, GDN):
                n = out.numel() * mod.beta.numel()
            counts[part] = counts.get(part, 0.0) + n
        return fn

    for part, seq in model.named_children():
        for mod in seq.modules():
            if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, GDN)):
                hooks.append(mod.register_forward_hook(hook(part)))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size), 1)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    per = {k: v / (size * size) for k, v in counts.items()}
    entropy_model = sum(per.get(k, 0.0) for k in ("h_s", "ctx", "ep"))
    return {
        "encoder": per.get("g_a", 0.0) + per.get("h_a", 0.0) + entropy_model,
        "decoder": per.get("g_s", 0.0) + per.get("post", 0.0) + entropy_model,
    }


def param_count(model: nn.Module, part: str = "") -> int:
    mod = getattr(model, part) if part else model
    return sum(p.numel() for p in mod.parameters())


class OnDevice(nn.Module):
    """Runs ``module`` on ``device`` (float32, no TF32) for CPU tensors in and out."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.module = module.to(device)
        self.device = device

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        moved = [a.to(self.device) for a in args]
        return self.module(x.pin_memory().to(self.device, non_blocking=True), *moved).float().cpu()


class CodecEngine:
    """Load a codec checkpoint once; compress/decompress uint8 HxWx3 images."""

    def __init__(self, checkpoint_ref: str, threads: int = 0, device: str = "cpu",
                 avif_speed: int | None = None) -> None:
        """``avif_speed``: an AVIF-based codec's libavif encoder speed instead of its
        checkpoint's (encoder-only: streams decode alike whatever the speed)."""
        from models import checkpoint

        if threads:
            torch.set_num_threads(threads)
        from models import registry

        ck = checkpoint.load(checkpoint_ref, map_location="cpu")
        if registry.get(ck.name).kind != "codec":
            raise checkpoint.CheckpointError(f"{checkpoint_ref}: {ck.name} is not a codec")
        model: Any = ck.model
        try:
            model.load_coding_tensors(ck.meta.get("_extra_tensors", {}))
        except EntropyCodingError as e:
            raise checkpoint.CheckpointError(f"{checkpoint_ref}: {e}") from e
        self.device = torch.device(device)
        # a FactorizedCodec family member or an AvifRestoreCodec: the same coding interface
        self.model: Any = model.eval()
        if self.device.type != "cpu":
            # Only the encoder's float transforms move: a stream's tables are chosen by integer
            # networks on the decoded symbols (CPU, bit-exact), so where g_a/h_a ran cannot make
            # a stream undecodable; decoding stays on CPU.
            # A model may name its own (avif-restore-codec: the filter whose strengths its
            # encoder fits; its stream is AV1 plus three bytes, decodable wherever they were fitted).
            for name in getattr(self.model, "encoder_device_modules", ("g_a", "h_a")):
                if hasattr(self.model, name):
                    setattr(self.model, name, OnDevice(getattr(self.model, name), self.device))
        if avif_speed is not None:
            if not hasattr(ck.config, "avif_qualities"):
                raise ValueError(f"avif_speed applies to AVIF-based codecs, not {ck.name}")
            self.model.config = dataclasses.replace(ck.config, speed=avif.check_speed(avif_speed))
        self.name = ck.name
        self.sha256 = ck.sha256
        self.path = ck.path
        self.config: Any = self.model.config
        self.qualities = list(range(1, ck.config.num_qualities + 1))
        self.default_quality = ck.config.default_quality

    def compress(self, img: np.ndarray, quality: int | None = None) -> bytes:
        q = self.default_quality if quality is None else quality
        return self.model.compress(img, q, sha256=self.sha256)

    def compress_controlled(self, img: np.ndarray, quality: int | None = None,
                            target_psnr: float | None = None, max_bpp: float | None = None) -> Coded:
        """Encode ``img`` at a fixed ``quality`` (default: the checkpoint's), or pick the rung
        per image (rate control):

        - ``target_psnr`` P: the smallest quality whose decoded image reaches P dB (none does:
          the top rung);
        - ``max_bpp`` B: the highest quality whose stream is at most B bits per pixel (none is:
          the lowest rung);
        - both: the target PSNR searched only among the rungs within the bpp cap (none there
          reaches P: the highest rung within the cap).

        Rungs are found by binary search (bpp and PSNR rise with the quality on a trained
        ladder: ``rung_search`` says what it guarantees when they do not), so a 7-rung ladder
        costs at most 3 encodes (and decodes, for PSNR) per condition instead of 7; the
        analysis transform runs once per image and is shared by every rung tried (the rungs
        differ only after it, by their gains). Returns the chosen stream, its decoded image and
        measures, and the rungs tried."""
        if quality is not None and (target_psnr is not None or max_bpp is not None):
            raise ValueError("a fixed quality excludes target_psnr / max_bpp")
        for name, v in (("target_psnr", target_psnr), ("max_bpp", max_bpp)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        analysed = self.model.analyse(img)
        pixels = img.shape[0] * img.shape[1]
        streams: dict[int, bytes] = {}
        decoded: dict[int, np.ndarray] = {}

        def stream(q: int) -> bytes:
            if q not in streams:
                if hasattr(self.model, "compress_and_decode"):  # the decode comes with the stream
                    streams[q], decoded[q] = self.model.compress_and_decode(img, q, self.sha256, analysed)
                else:
                    streams[q] = self.model.compress(img, q, sha256=self.sha256, analysed=analysed)
            return streams[q]

        def image(q: int) -> np.ndarray:
            if q not in decoded:
                decoded[q] = self.decompress(stream(q))
            return decoded[q]

        lo, hi = self.qualities[0], self.qualities[-1]
        if target_psnr is None and max_bpp is None:
            q = self.default_quality if quality is None else int(quality)
        else:
            top = hi
            if max_bpp is not None:
                fits = rung_search(lambda r: len(stream(r)) * 8 / pixels <= max_bpp, lo, hi, last=True)
                top = lo if fits is None else fits
            if target_psnr is not None:
                reach = rung_search(lambda r: psnr_uint8(image(r), img, float("inf")) >= target_psnr, lo, top)
                q = top if reach is None else reach
            else:
                q = top
        data = stream(q)
        rec = image(q)
        return Coded(data=data, quality=q, image=rec, psnr=psnr_uint8(rec, img, float("inf")),
                     bpp=len(data) * 8 / pixels, tried=tuple(sorted(streams)))

    def decompress(self, data: bytes) -> np.ndarray:
        return self.model.decompress(data, sha256=self.sha256)


@dataclass(frozen=True)
class Coded:
    """One image coded by :meth:`CodecEngine.compress_controlled`."""

    data: bytes  # the whole stream (header + payload)
    quality: int  # the rung it was coded at
    image: np.ndarray  # the decoded uint8 HxWx3 image
    psnr: float  # dB, decoded vs source (inf when identical)
    bpp: float  # len(data) * 8 / pixels
    tried: tuple[int, ...]  # rungs encoded on the way (the chosen one included)


def rung_search(pred: Callable[[int], bool], lo: int, hi: int, last: bool = False) -> int | None:
    """Binary search over the rungs ``lo..hi`` for a predicate that is false below some rung
    and true from it on (``last=False``: the smallest true rung), or true up to some rung and
    false above it (``last=True``: the largest true rung); None when no rung qualifies.

    ``pred`` is evaluated at about log2(hi - lo + 2) rungs. When it is not monotone the result
    still qualifies and sits at a boundary (``last=False``: the rung below it, if any, does not
    qualify; ``last=True``: the rung above it does not), though another boundary may exist."""
    if hi < lo:
        return None
    if last:
        # invariant: pred(a) true or a == lo - 1; pred(b) false or b == hi + 1
        a, b = lo - 1, hi + 1
        while b - a > 1:
            mid = (a + b) // 2
            if pred(mid):
                a = mid
            else:
                b = mid
        return a if a >= lo else None
    # invariant: pred(a) false or a == lo - 1; pred(b) true or b == hi + 1
    a, b = lo - 1, hi + 1
    while b - a > 1:
        mid = (a + b) // 2
        if pred(mid):
            b = mid
        else:
            a = mid
    return b if b <= hi else None


def bpp(data: bytes, width: int, height: int) -> float:
    return len(data) * 8 / (width * height)


def register_all(register: Any, entry_cls: Any) -> None:
    register(
        entry_cls(
            name=NAME,
            kind="codec",
            config_cls=CodecConfig,
            factory=FactorizedCodec,
            presets={
                "tiny": {"channels": 8, "latent_channels": 8, "filters": (3,)},
                "small": {"channels": 64, "latent_channels": 96},
                "base": {"channels": 128, "latent_channels": 192},
            },
        )
    )
