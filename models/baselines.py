"""Classical denoising baselines behind the same interface as the learned model.

Every method takes a uint8 HxWx3 image and a noise level ``sigma`` in 0–255 units and returns a
uint8 HxWx3 image. ``sigma=None`` means "not known": the classical methods then estimate it with
:func:`pipeline.infer.estimate_sigma` (they cannot run without one); the learned model runs
blind. ``sigma <= 0`` makes the classical filters return the input unchanged (nothing to remove).

Parameter rules (gaussian, median) were tuned once on 20 random 192x192 crops of the *training*
photos 001–040 (never CBSD68 nor the held-out photos 041–049), with clipped, rounded AWGN at
σ ∈ {2, 3, 4, 5, 7, 8, 9, 10, 15, 20, 22, 25, 35, 40, 45, 50, 55, 60, 75}, by grid search:

* ``gaussian``: width ``0.3 + 0.026·σ`` pixels (least-squares fit of the per-σ best widths,
  0.40 at σ=5 … 1.60 at σ=50 … 2.15 at σ=75; the rule costs < 0.1 dB against the best width
  at every σ tried); identity below σ=3, where any blur lost PSNR.
* ``median``: square per-channel window of 1 (identity) for σ < 9.5, 3 for σ < 22, 5 for
  σ < 38, 7 for σ < 55 and 9 above (the measured crossover points of the mean PSNR).
* ``nlm``: scikit-image's documented recipe, ``h = 0.8·σ``, ``fast_mode=True``, patch 5,
  distance 6 (not tuned).
* ``bm3d``: ``bm3d.bm3d_rgb`` (CBM3D, opponent colour space, default profile).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

DEFAULT_CHECKPOINT = "denoiser-base"

#: Gaussian blur width (pixels) as a function of σ: ``GAUSS_W0 + GAUSS_SLOPE * sigma``.
GAUSS_W0 = 0.3
GAUSS_SLOPE = 0.026
GAUSS_MIN_SIGMA = 3.0
#: Median window: the first size whose upper σ bound is above σ (σ ≥ the last bound → 9).
MEDIAN_STEPS: tuple[tuple[float, int], ...] = ((9.5, 1), (22.0, 3), (38.0, 5), (55.0, 7))
MEDIAN_MAX_SIZE = 9


def _to_uint8(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, dtype=np.float64) * scale), 0, 255).astype(np.uint8)


def _check(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {img.dtype} {img.shape}")
    return img


def gaussian_width(sigma: float) -> float:
    """Blur width in pixels for noise ``sigma`` (0 = no blur)."""
    return 0.0 if sigma < GAUSS_MIN_SIGMA else GAUSS_W0 + GAUSS_SLOPE * sigma


def median_size(sigma: float) -> int:
    """Median window side for noise ``sigma`` (1 = no filtering)."""
    for bound, size in MEDIAN_STEPS:
        if sigma < bound:
            return size
    return MEDIAN_MAX_SIZE


class Method:
    """A denoiser: ``denoise(uint8 HxWx3, sigma | None) -> uint8 HxWx3``.

    ``blind``: a benchmark hands this method ``None`` instead of the true σ (it is meant to run
    without knowing the noise level); otherwise it gets the true σ (oracle, as in published
    tables).
    """

    name: str = "method"
    blind: bool = False

    def denoise(self, img: np.ndarray, sigma: float | None) -> np.ndarray:
        img = _check(img)
        s = self._sigma(img, sigma)
        return self._run(img, s)

    def _sigma(self, img: np.ndarray, sigma: float | None) -> float:
        if sigma is not None:
            return float(sigma)
        from pipeline.infer import estimate_sigma

        return estimate_sigma(img)

    def _run(self, img: np.ndarray, sigma: float) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "blind": self.blind}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Noisy(Method):
    """The input itself: the floor every method has to beat."""

    name = "noisy"

    def denoise(self, img: np.ndarray, sigma: float | None) -> np.ndarray:
        return _check(img).copy()


class Gaussian(Method):
    name = "gaussian"

    def _run(self, img: np.ndarray, sigma: float) -> np.ndarray:
        from skimage.filters import gaussian

        w = gaussian_width(sigma)
        if w <= 0:
            return img.copy()
        out = gaussian(img.astype(np.float64), sigma=w, channel_axis=-1, preserve_range=True)
        return _to_uint8(out)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(),
                "rule": f"width = {GAUSS_W0} + {GAUSS_SLOPE}*sigma px (0 below sigma {GAUSS_MIN_SIGMA})"}


class Median(Method):
    name = "median"

    def _run(self, img: np.ndarray, sigma: float) -> np.ndarray:
        from scipy.ndimage import median_filter

        k = median_size(sigma)
        if k <= 1:
            return img.copy()
        return median_filter(img, size=(k, k, 1), mode="reflect")

    def describe(self) -> dict[str, Any]:
        steps = ", ".join(f"{s} below {b}" for b, s in MEDIAN_STEPS)
        return {**super().describe(), "rule": f"size {steps}, else {MEDIAN_MAX_SIZE} (per channel)"}


class NLMeans(Method):
    name = "nlm"

    def __init__(self, h_factor: float = 0.8, patch_size: int = 5, patch_distance: int = 6) -> None:
        self.h_factor = h_factor
        self.patch_size = patch_size
        self.patch_distance = patch_distance

    def _run(self, img: np.ndarray, sigma: float) -> np.ndarray:
        from skimage.restoration import denoise_nl_means

        if sigma <= 0:
            return img.copy()
        s = sigma / 255.0
        out = denoise_nl_means(img.astype(np.float64) / 255.0, h=self.h_factor * s, sigma=s,
                               fast_mode=True, patch_size=self.patch_size,
                               patch_distance=self.patch_distance, channel_axis=-1)
        return _to_uint8(out, 255.0)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "h": f"{self.h_factor}*sigma", "fast_mode": True,
                "patch_size": self.patch_size, "patch_distance": self.patch_distance}


def bm3d_available() -> bool:
    try:
        import bm3d  # noqa: F401
    except ImportError:
        return False
    return True


class BM3D(Method):
    name = "bm3d"

    def __init__(self) -> None:
        try:
            import bm3d
        except ImportError as e:
            raise ImportError(
                "the bm3d baseline needs the optional 'bm3d' package: pip install aejob[bm3d]"
            ) from e
        self._bm3d = bm3d

    def _run(self, img: np.ndarray, sigma: float) -> np.ndarray:
        if sigma <= 0:
            return img.copy()
        out = self._bm3d.bm3d_rgb(img.astype(np.float64) / 255.0, sigma / 255.0)
        return _to_uint8(out, 255.0)

    def describe(self) -> dict[str, Any]:
        version = getattr(self._bm3d, "__version__", None)
        if version is None:
            from importlib.metadata import PackageNotFoundError
            from importlib.metadata import version as _v

            try:
                version = _v("bm3d")
            except PackageNotFoundError:
                version = None
        return {**super().describe(), "function": "bm3d.bm3d_rgb", "version": version}


class AejobDenoiser(Method):
    """The learned denoiser (``pipeline.infer.DenoiseEngine``).

    ``aejob``: the default auto mode (noise level estimated per image, no sigma given);
    ``aejob-blind``: the network alone; ``aejob-sigma``: told the true sigma (an oracle);
    ``aejob-x4``/``aejob-x8``: auto mode averaged over 4/8 rotated and mirrored views.
    """

    def __init__(self, checkpoint: str = DEFAULT_CHECKPOINT, oracle: bool = False,
                 device: str = "cpu", threads: int = 0, engine: Any = None, blind_net: bool = False,
                 ensemble: int = 1) -> None:
        from pipeline.infer import DenoiseEngine

        self.name = "aejob-sigma" if oracle else "aejob-blind" if blind_net else "aejob"
        if ensemble > 1:
            self.name += f"-x{ensemble}"
        self.ensemble = ensemble
        self.blind = not oracle
        self.blind_net = blind_net
        self.checkpoint = str(checkpoint)
        self.engine = engine if engine is not None else DenoiseEngine(
            self.checkpoint, device=device, threads=threads)

    def denoise(self, img: np.ndarray, sigma: float | None) -> np.ndarray:
        if self.blind_net:
            return self.engine.denoise_one(_check(img), "blind", self.ensemble)
        # None: the engine's auto mode (estimated level); the oracle variant gets the true one
        return self.engine.denoise_one(_check(img), None if sigma is None else float(sigma), self.ensemble)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "checkpoint": self.checkpoint,
                "model": self.engine.name, "sha256": self.engine.sha256,
                "device": str(self.engine.device), "ensemble": self.ensemble}


_FACTORIES: dict[str, Callable[..., Method]] = {
    "noisy": lambda **kw: Noisy(),
    "gaussian": lambda **kw: Gaussian(),
    "median": lambda **kw: Median(),
    "nlm": lambda **kw: NLMeans(),
    "bm3d": lambda **kw: BM3D(),
    "aejob": lambda **kw: AejobDenoiser(oracle=False, **kw),
    "aejob-blind": lambda **kw: AejobDenoiser(blind_net=True, **kw),
    "aejob-sigma": lambda **kw: AejobDenoiser(oracle=True, **kw),
    "aejob-x2": lambda **kw: AejobDenoiser(ensemble=2, **kw),
    "aejob-x4": lambda **kw: AejobDenoiser(ensemble=4, **kw),
    "aejob-x8": lambda **kw: AejobDenoiser(ensemble=8, **kw),
}

#: Every method name ``get_method`` knows.
METHOD_NAMES: tuple[str, ...] = tuple(_FACTORIES)
#: The classical ones (no checkpoint).
CLASSICAL_NAMES: tuple[str, ...] = ("noisy", "gaussian", "median", "nlm", "bm3d")

_MODEL_KWARGS = {"checkpoint", "device", "threads", "engine"}


def get_method(name: str, **kw: Any) -> Method:
    """Build method ``name``. The aejob methods take ``checkpoint``, ``device``, ``threads``
    (and ``engine``, to share one loaded model); keyword arguments the method does not use are
    ignored, so one set of options can be passed to every method."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}") from None
    if name.startswith("aejob"):
        return factory(**{k: v for k, v in kw.items() if k in _MODEL_KWARGS})
    return factory()


def available_methods() -> list[str]:
    """Methods that can run here (bm3d only when its package is installed)."""
    return [n for n in METHOD_NAMES if n != "bm3d" or bm3d_available()]
