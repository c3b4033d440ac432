"""Decode + validate stage: image bytes -> 8-bit sRGB RGB pixels, or a precise error.

Pure functions, no Ray imports. :func:`decode_image` handles one file; :func:`decode_batch`
is the Ray Data ``map_batches`` function (``batch_format="numpy"``) that turns every failure
into an error row and never drops a row.

Decoding rules
--------------
Opening and validation

- Empty input (zero bytes or ``None``) -> ``DecodeError("empty file")``.
- ``Image.open(BytesIO(data), formats=list(options.formats))``: only the allow-listed Pillow
  decoders are tried (default :data:`ALLOWED_FORMATS`). Data no allowed decoder recognises ->
  ``"not a supported image (...)"``; the parenthesis says whether Pillow knows the format but
  it is not allowed (``"format ICO is not allowed"``) or shows the first bytes. A file whose
  magic matches an allowed format but whose header cannot be parsed ->
  ``"corrupt PNG header: ..."`` (or ``"truncated PNG header: ..."``).
- Pixel limit, checked from the header before any pixel data is decoded:
  ``width * height > options.max_pixels`` -> ``"image too large: 40000x40000 = 1600000000
  pixels > limit 100000000"``. For the duration of the call ``Image.MAX_IMAGE_PIXELS`` is set
  to ``options.max_pixels`` (and restored afterwards), so Pillow's own decompression-bomb
  guard uses the same limit; its ``DecompressionBombError`` becomes the same message and its
  ``DecompressionBombWarning`` (like every other warning raised while decoding) is captured
  with :func:`warnings.catch_warnings`, so it can neither be printed nor escape as an exception.
  The check is repeated after decoding (GIF frames can grow the canvas). Both the limit and
  the warning filters are process-global: decoding with *different* options concurrently in
  threads of one process is not supported (Ray tasks/actors each decode in one thread).
- ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set; ``img.load()`` runs inside the try, so a
  truncated or corrupt file fails: ``"truncated JPEG: image file is truncated (12 bytes not
  processed)"``, ``"corrupt PNG: ..."`` (format name + Pillow's message).

Frames and orientation

- Multi-frame files (``n_frames > 1``: animated GIF/PNG/WebP, multi-page TIFF, MPO) -> the
  first frame, note ``"animated: first of N frames"``.
- EXIF orientation (2..8, read with ``img.getexif()``, which also covers TIFF tags and XMP
  ``tiff:Orientation``) is applied with the same transposes as ``ImageOps.exif_transpose``,
  but directly (``img.transpose``): ``exif_transpose`` would also re-serialise the EXIF/XMP of
  the returned image (wasted work that can raise on malformed EXIF; the output EXIF is built
  separately below) and copies the image when there is nothing to do. ``width``/``height``
  are the displayed size; note ``"EXIF orientation N applied"``.

Colour (every output is 8-bit RGB)

- ``1``, ``L``, ``P`` without transparency, ``RGB``, ``RGBX``, ``YCbCr``, ``LAB``, ``HSV`` ->
  ``convert("RGB")``.
- ``P`` with a ``transparency`` entry, ``PA``, ``LA``, ``La``, ``RGBA``, ``RGBa`` -> colour
  and alpha are separated and the colour is composited over white; note ``"alpha composited
  on white"`` (also when the alpha happens to be fully opaque; the compositing is then
  skipped).
- ``CMYK`` -> RGB, note ``"CMYK converted to RGB"`` (through the embedded profile if there is
  one, otherwise Pillow's naive conversion).
- 16-bit (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, and ``I`` whose values fit 0..65535) ->
  ``round(v * 255 / 65535)``, note ``"16-bit scaled to 8-bit"``; ``I`` with any value outside
  0..65535 -> min..max stretched to 0..255, note ``"32-bit integer scaled to 8-bit (range
  lo..hi)"``; ``F`` -> ``v * 255`` if max <= 1.0, else clipped to 0..255 (NaN -> 0), note
  ``"float image scaled to 8-bit"``. Grey results are replicated to RGB.
- Embedded ICC profile (``img.info["icc_profile"]``) on an ``L``, ``RGB`` or ``CMYK`` colour
  image (after the steps above) -> converted to sRGB with LittleCMS (``ImageCms``, perceptual
  intent; transforms are cached per profile), note ``"ICC profile converted to sRGB"``. A
  profile whose description names it sRGB (``"sRGB IEC61966-2.1"``, ``"sRGB built-in"``, ...)
  is already the target space: pixels are left unchanged and no note is added. If the profile
  cannot be parsed or does not match the pixels, the plain conversion is kept and the note is
  ``"ICC profile ignored: <reason>"``.

EXIF carried to the output (``Decoded.exif``)

- ``img.getexif()`` of the original file, minus Orientation (0x0112), the GPS IFD (0x8825,
  note ``"GPS metadata removed"``) and TIFF image-structure tags (strip offsets, bits per
  sample, embedded ICC/XMP/IPTC blobs...; a TIFF file's own tag directory is what Pillow reports
  as its EXIF), serialised with ``Exif.tobytes()`` (starts with ``b"Exif\\0\\0"``, ready for
  ``save(exif=...)``). The Exif sub-IFD (0x8769, dates, exposure...) and Make/Model are kept;
  the thumbnail IFD1 is not written. ``None`` when there is nothing to carry (no EXIF, or only
  tags that are stripped). EXIF that cannot be read or re-serialised is dropped with a note
  (``"EXIF dropped: ..."``); it never fails the row.

Output pixels are ``uint8``, shape ``(H, W, 3)``, C-contiguous, RGB. The array is a read-only
view of the bytes Pillow produced (``np.asarray``): copy it before modifying it in place.
"""

from __future__ import annotations

import functools
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "DecodeError",
    "DecodeOptions",
    "Decoded",
    "decode_batch",
    "decode_image",
]

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "MPO")
DEFAULT_MAX_PIXELS = 100_000_000

_ORIENTATION = 0x0112
_GPS_IFD = 0x8825
# TIFF image-structure tags and embedded blobs: meaningless (or wrong) once the pixels are
# re-encoded. They appear when the source is a TIFF, whose tag directory *is* its EXIF IFD0.
_STRUCTURE_TAGS = frozenset(
    {
        0x00FE,  # NewSubfileType
        0x00FF,  # SubfileType
        0x0100,  # ImageWidth
        0x0101,  # ImageLength
        0x0102,  # BitsPerSample
        0x0103,  # Compression
        0x0106,  # PhotometricInterpretation
        0x0107,  # Threshholding
        0x010A,  # FillOrder
        0x0111,  # StripOffsets
        0x0115,  # SamplesPerPixel
        0x0116,  # RowsPerStrip
        0x0117,  # StripByteCounts
        0x0118,  # MinSampleValue
        0x0119,  # MaxSampleValue
        0x011C,  # PlanarConfiguration
        0x0122,  # GrayResponseUnit
        0x0123,  # GrayResponseCurve
        0x0124,  # T4Options
        0x0125,  # T6Options
        0x013D,  # Predictor
        0x0140,  # ColorMap
        0x0142,  # TileWidth
        0x0143,  # TileLength
        0x0144,  # TileOffsets
        0x0145,  # TileByteCounts
        0x014A,  # SubIFDs
        0x0152,  # ExtraSamples
        0x0153,  # SampleFormat
        0x0154,  # SMinSampleValue
        0x0155,  # SMaxSampleValue
        0x015B,  # JPEGTables
        0x0200,  # JPEGProc
        0x0201,  # JPEGInterchangeFormat
        0x0202,  # JPEGInterchangeFormatLength
        0x02BC,  # XMP packet
        0x83BB,  # IPTC-NAA
        0x8649,  # Photoshop image resources
        0x8773,  # InterColorProfile (ICC)
        0x935C,  # ImageSourceData (Photoshop layers)
    }
)
# EXIF orientation -> transpose that displays the image upright (as ImageOps.exif_transpose)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"PA", "LA", "La", "RGBA", "RGBa"})
_PLAIN_RGB_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "YCbCr", "LAB", "HSV"})
_ICC_MODES = frozenset({"L", "RGB", "CMYK"})
_BEFORE_ICC = {"1": "L", "RGBX": "RGB", "YCbCr": "RGB"}  # same colour space, profile-ready mode
_SRGB_DESCRIPTION = re.compile(r"^\s*sRGB\b")
_MAX_MESSAGE = 500


@dataclass(frozen=True)
class DecodeOptions:
    """Per-job decode settings (picklable, hashable)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    formats: tuple[str, ...] = ALLOWED_FORMATS

    def __post_init__(self) -> None:
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int):
            raise TypeError(f"max_pixels must be an int, got {self.max_pixels!r}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if isinstance(self.formats, str) or not self.formats:
            raise ValueError(f"formats must be a non-empty tuple of names, got {self.formats!r}")
        formats = tuple(str(f).upper() for f in self.formats)
        unknown = [f for f in formats if f not in ALLOWED_FORMATS]
        if unknown:
            Image.init()
            unknown = [f for f in unknown if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"unknown Pillow format name(s): {', '.join(unknown)}")
        object.__setattr__(self, "formats", formats)


class DecodeError(ValueError):
    """An input that cannot be turned into pixels; the message is user-facing."""


@dataclass
class Decoded:
    pixels: np.ndarray  # uint8 (H, W, 3), C-contiguous, RGB, as displayed
    width: int  # as displayed
    height: int  # as displayed
    format: str  # Pillow format name, e.g. "JPEG"
    exif: bytes | None  # EXIF for the output (no Orientation, no GPS); None if nothing to carry
    note: str | None  # human notes joined with "; "


# --------------------------------------------------------------------------------------------
# single image


def decode_image(data: bytes, options: DecodeOptions = DecodeOptions()) -> Decoded:
    """Decode one encoded image (see the module docstring for the rules).

    Raises :class:`DecodeError` for every problem with the input. Anything else that escapes
    is a bug (or ``MemoryError``)."""
    img, fmt, exif, notes = _decode_rgb(data, options)
    pixels = np.ascontiguousarray(np.asarray(img))
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise AssertionError(f"internal: decoded to {pixels.dtype} {pixels.shape}")
    return Decoded(
        pixels=pixels,
        width=img.width,
        height=img.height,
        format=fmt,
        exif=exif,
        note="; ".join(notes) or None,
    )


def _decode_rgb(
    data: Any, options: DecodeOptions
) -> tuple[Image.Image, str, bytes | None, list[str]]:
    """Shared core: returns (RGB image as displayed, format, output EXIF, notes)."""
    data = _as_bytes(data)
    if not data:
        raise DecodeError("empty file")
    previous_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = options.max_pixels
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            return _decode_open(data, options)
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def _decode_open(
    data: bytes, options: DecodeOptions
) -> tuple[Image.Image, str, bytes | None, list[str]]:
    notes: list[str] = []
    try:
        src = Image.open(BytesIO(data), formats=list(_open_formats(options.formats)))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(data, options, exc) from None
    except Exception as exc:  # UnidentifiedImageError, or a header error Pillow lets through
        raise _open_error(data, options, exc) from None

    with src:
        fmt = src.format or "image"
        if fmt not in options.formats:  # MPO files come through the JPEG decoder
            raise _not_allowed(fmt, options)
        _check_size(src.size, options)

        n_frames = 1
        try:
            n_frames = int(getattr(src, "n_frames", 1))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_large(data, options, exc) from None
        except Exception as exc:  # a broken later frame must not cost us the first one
            notes.append(f"frame count unknown ({_describe(exc)})")
        if n_frames > 1:
            src.seek(0)
            notes.append(f"animated: first of {n_frames} frames")

        try:
            src.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_large(data, options, exc) from None
        except Exception as exc:
            raise _load_error(fmt, exc) from None
        _check_size(src.size, options)

        exif_obj: Image.Exif | None = None
        orientation = None
        try:
            exif_obj = src.getexif()
            orientation = exif_obj.get(_ORIENTATION)
        except Exception as exc:
            exif_obj = None
            notes.append(f"EXIF dropped: {_describe(exc)}")
        icc = src.info.get("icc_profile")

        img: Image.Image = src
        method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
        if method is not None:
            img = src.transpose(method)
            notes.append(f"EXIF orientation {orientation} applied")

        exif_out = _output_exif(exif_obj, notes) if exif_obj is not None else None
        rgb = _to_rgb(img, icc, notes)
    return rgb, fmt, exif_out, notes


# --------------------------------------------------------------------------------------------
# colour


def _to_rgb(img: Image.Image, icc: bytes | None, notes: list[str]) -> Image.Image:
    mode = img.mode
    alpha: Image.Image | None = None

    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        img = _high_bit_depth_to_l(img, notes)
    elif mode == "P" and "transparency" in img.info or mode in _ALPHA_MODES:
        rgba = img.convert("LA" if mode in ("LA", "La") else "RGBA")
        alpha = rgba.getchannel("A")
        img = rgba.convert("L" if rgba.mode == "LA" else "RGB")
        notes.append("alpha composited on white")
    elif mode == "P":
        img = img.convert("RGB")
    elif mode not in _PLAIN_RGB_MODES and mode != "CMYK":
        raise DecodeError(f"unsupported pixel mode {mode}")

    if icc and img.mode in _BEFORE_ICC:
        img = img.convert(_BEFORE_ICC[img.mode])
    if img.mode == "CMYK":
        notes.append("CMYK converted to RGB")
    converted = _apply_icc(img, icc, notes) if icc else None
    if converted is not None:
        img = converted
    elif img.mode != "RGB":
        img = img.convert("RGB")

    if alpha is not None and alpha.getextrema() != (255, 255):
        canvas = Image.new("RGB", img.size, (255, 255, 255))
        canvas.paste(img, (0, 0), alpha)
        img = canvas
    return img


def _high_bit_depth_to_l(img: Image.Image, notes: list[str]) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        values = np.nan_to_num(arr.astype(np.float32, copy=False), nan=0.0)
        finite_max = float(values.max()) if values.size else 0.0
        if finite_max <= 1.0:
            values = np.clip(values, 0.0, 1.0) * np.float32(255.0)
        else:
            values = np.clip(values, 0.0, 255.0)
        out = np.rint(values).astype(np.uint8)
        notes.append("float image scaled to 8-bit")
        return Image.fromarray(out)

    lo = int(arr.min()) if arr.size else 0
    hi = int(arr.max()) if arr.size else 0
    if lo >= 0 and hi <= 65535:
        wide = arr.astype(np.uint32)
        wide *= 255
        wide += 32767
        wide //= 65535
        notes.append("16-bit scaled to 8-bit")
        return Image.fromarray(wide.astype(np.uint8))

    if hi == lo:
        out = np.zeros(arr.shape, dtype=np.uint8)
    else:
        scaled = arr.astype(np.float64)
        scaled -= lo
        scaled *= 255.0 / (hi - lo)
        out = np.rint(scaled).astype(np.uint8)
    notes.append(f"32-bit integer scaled to 8-bit (range {lo}..{hi})")
    return Image.fromarray(out)


def _apply_icc(img: Image.Image, icc: bytes, notes: list[str]) -> Image.Image | None:
    """Convert ``img`` (L/RGB/CMYK) to sRGB RGB through its profile; None = not converted."""
    if img.mode not in _ICC_MODES:
        notes.append(f"ICC profile ignored: not applicable to mode {img.mode}")
        return None
    try:
        transform = _icc_transform(bytes(icc), img.mode)
    except Exception as exc:
        notes.append(f"ICC profile ignored: {_describe(exc, with_class=False)}")
        return None
    if transform is None:  # already sRGB
        return img if img.mode == "RGB" else None
    try:
        out = ImageCms.applyTransform(img, transform)
    except Exception as exc:
        notes.append(f"ICC profile ignored: {_describe(exc, with_class=False)}")
        return None
    if out is None or out.mode != "RGB":
        notes.append("ICC profile ignored: transform did not produce RGB")
        return None
    notes.append("ICC profile converted to sRGB")
    return out


@functools.lru_cache(maxsize=1)
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.lru_cache(maxsize=32)
def _icc_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """LittleCMS transform ``mode`` + embedded profile -> sRGB RGB (None: already sRGB)."""
    try:
        profile = ImageCms.ImageCmsProfile(BytesIO(icc))
    except Exception as exc:
        raise DecodeError(f"unreadable profile ({_describe(exc, with_class=False)})") from None
    core = profile.profile
    space = (core.xcolor_space or "").strip()
    description = core.profile_description or ""
    if mode == "RGB" and space == "RGB" and _SRGB_DESCRIPTION.match(description):
        return None
    return ImageCms.buildTransform(
        profile, _srgb_profile(), mode, "RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL
    )


# --------------------------------------------------------------------------------------------
# EXIF


def _output_exif(exif: Image.Exif, notes: list[str]) -> bytes | None:
    try:
        if _GPS_IFD in exif:
            notes.append("GPS metadata removed")
        for tag in (_ORIENTATION, _GPS_IFD, *_STRUCTURE_TAGS):
            if tag in exif:
                del exif[tag]
        # Exif.tobytes() also writes GPS/Exif IFDs cached by an earlier get_ifd() call even
        # when the pointer tag is gone; make sure the GPS one cannot come back that way.
        cached = getattr(exif, "_ifds", None)
        if isinstance(cached, dict):
            cached.pop(_GPS_IFD, None)
        if len(exif) == 0:
            return None
        return exif.tobytes()
    except Exception as exc:
        notes.append(f"EXIF dropped: {_describe(exc)}")
        return None


# --------------------------------------------------------------------------------------------
# errors


def _check_size(size: tuple[int, int], options: DecodeOptions) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid image size {width}x{height}")
    if width * height > options.max_pixels:
        raise DecodeError(
            f"image too large: {width}x{height} = {width * height} pixels > limit "
            f"{options.max_pixels}"
        )


def _too_large(data: bytes, options: DecodeOptions, exc: Exception) -> DecodeError:
    """Pillow refused the size; report it the same way as our own check, with dimensions."""
    probe = _probe(data, options.formats)
    if probe is not None and probe[1] is not None:
        width, height = probe[1]
        if width * height > options.max_pixels:
            return DecodeError(
                f"image too large: {width}x{height} = {width * height} pixels > limit "
                f"{options.max_pixels}"
            )
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = match.group(1) if match else "?"
    return DecodeError(f"image too large: {pixels} pixels > limit {options.max_pixels}")


def _open_error(data: bytes, options: DecodeOptions, exc: Exception) -> DecodeError:
    probe = _probe(data, options.formats)
    if probe is not None:
        fmt, _size, probe_exc = probe
        cause = probe_exc if probe_exc is not None else exc
        kind = "truncated" if _looks_truncated(cause) else "corrupt"
        return DecodeError(f"{kind} {fmt} header: {_describe(cause)}")
    if not isinstance(exc, UnidentifiedImageError):
        return DecodeError(f"corrupt image header: {_describe(exc)}")
    other = _other_known_format(data[:16], options.formats)
    if other is not None:
        return _not_allowed(other, options)
    head = data[:12]
    if _is_text(data[:512]):
        return DecodeError(f"not a supported image (looks like text: {head!r}...)")
    return DecodeError(f"not a supported image (unrecognized header {head.hex(' ')})")


def _not_allowed(fmt: str, options: DecodeOptions) -> DecodeError:
    allowed = ", ".join(options.formats)
    return DecodeError(f"not a supported image (format {fmt} is not allowed; allowed: {allowed})")


@functools.lru_cache(maxsize=16)
def _open_formats(formats: tuple[str, ...]) -> tuple[str, ...]:
    """Decoder names for ``Image.open``: Pillow has no "MPO" opener (the JPEG one returns MPO
    files) and raises KeyError for names it does not know."""
    Image.init()
    names = [f for f in formats if f in Image.OPEN]
    if "MPO" in formats and "JPEG" not in names:
        names.append("JPEG")
    return tuple(names)


def _probe(
    data: bytes, formats: Sequence[str]
) -> tuple[str, tuple[int, int] | None, Exception | None] | None:
    """Run the header parser of the first allowed format whose magic matches, without
    Pillow's size guard: (format, size, None) or (format, None, exception); None if no
    magic matches."""
    prefix = data[:16]
    for fmt in _open_formats(tuple(formats)):
        entry = Image.OPEN.get(fmt)
        if entry is None:
            continue
        factory, accept = entry
        accepted = accept(prefix) if accept is not None else True
        if not accepted or isinstance(accepted, str):
            continue
        try:
            with factory(BytesIO(data), "") as im:
                return fmt, im.size, None
        except Exception as exc:
            return fmt, None, exc
    return None


def _other_known_format(prefix: bytes, allowed: Sequence[str]) -> str | None:
    Image.init()
    for fmt, (_factory, accept) in Image.OPEN.items():
        if fmt in allowed or accept is None:
            continue
        try:
            accepted = accept(prefix)
        except Exception:
            continue
        if accepted and not isinstance(accepted, str):
            return fmt
    return None


def _load_error(fmt: str, exc: Exception) -> DecodeError:
    kind = "truncated" if _looks_truncated(exc) else "corrupt"
    return DecodeError(f"{kind} {fmt}: {_describe(exc)}")


def _looks_truncated(exc: Exception) -> bool:
    if isinstance(exc, (EOFError, struct.error)):
        return True
    text = str(exc).lower()
    return "truncated" in text or "broken data stream" in text or "premature end" in text


def _is_text(chunk: bytes) -> bool:
    if not chunk:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in chunk)
    return printable >= 0.95 * len(chunk)


def _describe(exc: BaseException, with_class: bool | None = None) -> str:
    """One line: Pillow's message, prefixed with the class name unless it is an OSError /
    SyntaxError / ValueError with a message (Pillow's usual, already descriptive ones)."""
    text = " ".join(str(exc).split())
    if with_class is None:
        with_class = not text or not isinstance(exc, (OSError, SyntaxError, ValueError))
    if with_class:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:_MAX_MESSAGE]


def _as_bytes(data: Any) -> bytes:
    if data is None:
        return b""
    if isinstance(data, bytes):
        return data
    if isinstance(data, np.ndarray):
        return data.tobytes()
    if isinstance(data, (bytearray, memoryview, np.bytes_)):
        return bytes(data)
    raise DecodeError(f"data must be bytes, got {type(data).__name__}")


# --------------------------------------------------------------------------------------------
# batch


def decode_batch(
    batch: dict[str, np.ndarray], options: DecodeOptions = DecodeOptions()
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function (``batch_format="numpy"``).

    Decodes ``data`` of every row whose ``status`` is ``"ok"`` (and whose ``kind``, if that
    column exists, is ``"item"``). Adds ``pixels`` (bytes of the (H, W, 3) uint8 array, or
    None), ``width``/``height`` (int64, 0 when not decoded) and ``exif`` (bytes or None);
    updates ``status``/``error``/``note``; drops ``data``; passes every other column through.
    Never drops or reorders rows; never raises for a bad row.
    """
    n = _batch_len(batch)
    datas = batch.get("data")
    statuses = batch.get("status")
    errors = batch.get("error")
    notes_in = batch.get("note")
    kinds = batch.get("kind")

    status_out: list[Any] = [_cell(statuses, i, "ok") for i in range(n)]
    error_out: list[Any] = [_cell(errors, i, None) for i in range(n)]
    note_out: list[Any] = [_cell(notes_in, i, None) for i in range(n)]
    pixels_out: list[Any] = [None] * n
    exif_out: list[Any] = [None] * n
    width = np.zeros(n, dtype=np.int64)
    height = np.zeros(n, dtype=np.int64)

    for i in range(n):
        if status_out[i] != "ok":
            continue
        if kinds is not None and _cell(kinds, i, None) != "item":
            continue
        try:
            img, _fmt, exif, notes = _decode_rgb(_cell(datas, i, None), options)
            if img.mode != "RGB":
                raise AssertionError(f"internal: decoded to mode {img.mode}")
            pixels_out[i] = img.tobytes()
            width[i], height[i] = img.size
            exif_out[i] = exif
            note_out[i] = _join_notes(note_out[i], notes)
        except DecodeError as exc:
            status_out[i] = "error"
            error_out[i] = _describe(exc, with_class=False)
        except Exception as exc:  # a bug or MemoryError: still one row, never a lost batch
            status_out[i] = "error"
            error_out[i] = _describe(exc, with_class=True)

    out = {name: column for name, column in batch.items() if name != "data"}
    out["status"] = _object_array(status_out)
    out["error"] = _object_array(error_out)
    out["note"] = _object_array(note_out)
    out["pixels"] = _object_array(pixels_out)
    out["width"] = width
    out["height"] = height
    out["exif"] = _object_array(exif_out)
    return out


def _batch_len(batch: dict[str, np.ndarray]) -> int:
    lengths = {len(column) for column in batch.values()}
    if len(lengths) > 1:
        raise ValueError(f"batch columns have different lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def _cell(column: np.ndarray | None, i: int, default: Any) -> Any:
    if column is None:
        return default
    value = column[i]
    if isinstance(value, np.str_):
        return str(value)
    return value


def _join_notes(previous: Any, notes: list[str]) -> str | None:
    parts = [str(previous)] if previous is not None and str(previous) != "" else []
    parts.extend(notes)
    return "; ".join(parts) or None


def _object_array(values: list[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr
