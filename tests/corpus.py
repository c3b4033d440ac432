"""Bad-input image corpus, generated in memory (deterministic, no downloads).

Used by the decode unit tests and by end-to-end tests (``write_corpus`` puts the files in a
folder or bucket prefix). Every :class:`Case` says what the decode stage must do with it:
``expect="ok"`` (with the displayed ``size`` and optionally a substring of the note) or
``expect="error"`` (with a substring of the error message; compare lowercase).

Also exports the ICC profile builders used by the tests: :func:`srgb_profile`,
:func:`swapped_primaries_profile` (a non-sRGB RGB profile: sRGB with red and blue primaries
swapped, so pure red decodes to blue) and :func:`cmyk_profile` (a tiny hand-built ICC v2 CMYK
output profile with a CMYK->Lab lookup table).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

SEED = 20240611


@dataclass(frozen=True)
class Case:
    name: str  # file name, e.g. "truncated.jpg"
    data: bytes
    expect: str  # "ok" or "error"
    error_contains: str | None = None  # substring of the error message (lowercase compare)
    size: tuple[int, int] | None = None  # expected (width, height) as displayed, ok cases
    note_contains: str | None = None  # substring of the note (lowercase compare)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def noise_rgb(width: int, height: int, seed: int = SEED) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def gradient_rgb(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    arr = np.empty((height, width, 3), dtype=np.uint8)
    arr[..., 0] = x
    arr[..., 1] = y
    arr[..., 2] = (x + y) / 2
    return Image.fromarray(arr)


def fast_png(arr: np.ndarray, level: int = 1) -> bytes:
    """Minimal PNG writer for big uint8 (H, W, 3) arrays: filter 0 on every row, one IDAT,
    zlib ``level``. Several times faster than Pillow's encoder for the 81 MP test image."""
    height, width, channels = arr.shape
    assert arr.dtype == np.uint8 and channels == 3
    raw = np.zeros((height, 1 + width * 3), dtype=np.uint8)  # column 0: filter type 0
    raw[:, 1:] = arr.reshape(height, width * 3)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(payload, zlib.crc32(kind))
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw.data, level))
        + chunk(b"IEND", b"")
    )


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny valid 1x1 greyscale PNG whose IHDR is patched (CRC fixed) to claim another size:
    the header says e.g. 40000x40000 while the file is ~70 bytes."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


# ------------------------------------------------------------------------------------------
# ICC profiles


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def swapped_primaries_profile() -> bytes:
    """sRGB with the rXYZ/bXYZ (and rTRC/bTRC) tag offsets swapped and the description renamed
    (so it is not mistaken for sRGB): a valid RGB matrix/TRC profile in which (255, 0, 0)
    means sRGB blue and (0, 0, 255) sRGB red."""
    prof = bytearray(srgb_profile())
    count = struct.unpack(">I", prof[128:132])[0]
    entries = {}
    for i in range(count):
        start = 132 + 12 * i
        entries[bytes(prof[start : start + 4])] = start
    for a, b in ((b"rXYZ", b"bXYZ"), (b"rTRC", b"bTRC")):
        ea, eb = entries[a], entries[b]
        prof[ea + 4 : ea + 12], prof[eb + 4 : eb + 12] = (
            prof[eb + 4 : eb + 12],
            prof[ea + 4 : ea + 12],
        )
    for old, new in ((b"sRGB", b"xRGB"), ("sRGB".encode("utf-16-be"), "xRGB".encode("utf-16-be"))):
        prof = bytearray(bytes(prof).replace(old, new))
    prof[84:100] = bytes(16)  # profile ID (MD5) no longer valid: zero means "not computed"
    return bytes(prof)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0..1 -> CIE Lab (D65 white; used as the D50 PCS, i.e. white maps to white)."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        axis=-1,
    )


def _s15f16(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def cmyk_profile() -> bytes:
    """Minimal ICC v2 CMYK output profile ('prtr', PCS Lab) with only desc/cprt/wtpt/A2B0.

    A2B0 is a lut16 with a 2-point grid: each CMYK corner maps to the Lab of the naive
    RGB = (1-C)(1-K), (1-M)(1-K), (1-Y)(1-K). LittleCMS can use it as a transform input."""
    grid = 2
    corners = np.array(
        [[c, m, y, k] for c in (0, 1) for m in (0, 1) for y in (0, 1) for k in (0, 1)],
        dtype=np.float64,
    )  # first channel varies slowest, as the ICC CLUT layout requires
    rgb = (1 - corners[:, :3]) * (1 - corners[:, 3:4])
    lab = _srgb_to_lab(rgb)
    enc = np.empty_like(lab)
    enc[:, 0] = np.clip(lab[:, 0], 0, 100) * 652.80  # legacy 16-bit Lab: L 100 -> 0xFF00
    enc[:, 1:] = np.clip(lab[:, 1:] * 256 + 32768, 0, 65535)  # a/b: 0 -> 0x8000
    clut = np.rint(enc).astype(">u2").tobytes()

    identity = b"".join(_s15f16(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ramp = struct.pack(">HH", 0, 65535)
    a2b0 = (
        b"mft2"
        + bytes(4)
        + struct.pack(">BBBB", 4, 3, grid, 0)
        + identity
        + struct.pack(">HH", 2, 2)
        + ramp * 4
        + clut
        + ramp * 3
    )
    text = b"Test CMYK (naive)"
    desc = (
        b"desc"
        + bytes(4)
        + struct.pack(">I", len(text) + 1)
        + text
        + b"\0"
        + struct.pack(">II", 0, 0)
        + struct.pack(">HB", 0, 0)
        + bytes(67)
    )
    cprt = b"text" + bytes(4) + b"No copyright, test data\0"
    wtpt = b"XYZ " + bytes(4) + _s15f16(0.9642) + _s15f16(1.0) + _s15f16(0.8249)

    tags = [(b"desc", desc), (b"cprt", cprt), (b"wtpt", wtpt), (b"A2B0", a2b0)]
    offset = 128 + 4 + 12 * len(tags)
    table = struct.pack(">I", len(tags))
    body = b""
    for sig, payload in tags:
        table += sig + struct.pack(">II", offset + len(body), len(payload))
        body += payload + bytes(-len(payload) % 4)
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + bytes(4)  # preferred CMM
        + struct.pack(">I", 0x02100000)  # version 2.1
        + b"prtr"
        + b"CMYK"
        + b"Lab "
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
        + b"acsp"
        + bytes(4)  # platform
        + bytes(4)  # flags
        + bytes(8)  # manufacturer, model
        + bytes(8)  # attributes
        + struct.pack(">I", 0)  # rendering intent: perceptual
        + _s15f16(0.9642)
        + _s15f16(1.0)
        + _s15f16(0.8249)
        + bytes(4)  # creator
        + bytes(16)  # profile ID
        + bytes(28)  # reserved
    )
    assert len(header) == 128
    return header + table + body


# ------------------------------------------------------------------------------------------
# images


def _gps_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "TestMake"  # Make
    exif[0x0110] = "TestModel"  # Model
    exif[0x8769] = {0x9003: "2024:01:02 03:04:05"}  # Exif IFD: DateTimeOriginal
    exif[0x8825] = {  # GPS IFD
        0x0001: "N",
        0x0002: (52.0, 31.0, 12.5),
        0x0003: "E",
        0x0004: (13.0, 24.0, 36.25),
    }
    return exif


def rotated_jpeg(orientation: int = 6, size: tuple[int, int] = (40, 20)) -> bytes:
    """Left half red, right half blue; EXIF Orientation + Make/Model + a GPS block."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (220, 30, 30)
    arr[:, w // 2 :] = (30, 30, 220)
    exif = _gps_exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def cmyk_image(width: int = 32, height: int = 16) -> Image.Image:
    """Four vertical bands: white (no ink), cyan, magenta, black (K)."""
    arr = np.zeros((height, width, 4), dtype=np.uint8)
    q = width // 4
    arr[:, q : 2 * q, 0] = 255
    arr[:, 2 * q : 3 * q, 1] = 255
    arr[:, 3 * q :, 3] = 255
    return Image.frombytes("CMYK", (width, height), arr.tobytes())


def palette_transparent() -> Image.Image:
    """P image, index 0 transparent (left half), index 1 pure green."""
    img = Image.new("P", (16, 8), 1)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    img.paste(0, (0, 0, 8, 8))
    img.info["transparency"] = 0
    return img


def la_image() -> Image.Image:
    lum = np.full((8, 16), 0, dtype=np.uint8)  # black ...
    alpha = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (8, 1))  # ... fading in
    return Image.merge("LA", (Image.fromarray(lum), Image.fromarray(alpha)))


def animated_gif(frames: int = 3) -> bytes:
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [Image.new("RGB", (12, 10), colors[i % len(colors)]) for i in range(frames)]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)


def bad_corpus(include_huge: bool = False) -> list[Case]:
    rng = np.random.default_rng(SEED)
    photo = noise_rgb(64, 48)
    jpeg = encode(photo, "JPEG", quality=90)
    png = encode(photo, "PNG")
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # IHDR CRC

    gray16 = Image.fromarray(
        (np.arange(32 * 16, dtype=np.uint32).reshape(16, 32) * 127).astype(np.uint16)
    )
    rgba = np.zeros((8, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (8, 1))
    float_img = Image.fromarray(np.linspace(0, 1, 24 * 8, dtype=np.float32).reshape(8, 24))
    int_img = Image.fromarray(
        np.linspace(-100_000, 400_000, 24 * 8).astype(np.int32).reshape(8, 24)
    )
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    rotated_png_exif = Image.Exif()
    rotated_png_exif[0x0112] = 8

    cases = [
        # --- errors -------------------------------------------------------------------------
        Case("empty.jpg", b"", "error", error_contains="empty file"),
        Case("truncated.jpg", jpeg[: len(jpeg) // 2], "error", error_contains="truncated jpeg"),
        Case("truncated.png", png[: len(png) // 2], "error", error_contains="truncated png"),
        Case("header_only.png", png[:20], "error", error_contains="png header"),
        Case("bad_crc.png", bytes(bad_crc), "error", error_contains="corrupt png header"),
        Case("wrong_magic.png", rng.bytes(4096), "error", error_contains="not a supported image"),
        Case(
            "notes.jpg",
            b"Shot list for day 2\n- beach, golden hour\n- keep RAW files\n",
            "error",
            error_contains="not a supported image",
        ),
        Case(
            "icon.ico",
            encode(Image.new("RGB", (16, 16), (1, 2, 3)), "ICO"),
            "error",
            error_contains="format ico is not allowed",
        ),
        Case(
            "bomb.png",
            png_with_declared_size(40000, 40000),
            "error",
            error_contains="image too large: 40000x40000 = 1600000000 pixels",
        ),
        Case(  # between the limit and 2x the limit: Pillow only warns, we must still refuse
            "bomb_108mp.png",
            png_with_declared_size(12000, 9000),
            "error",
            error_contains="too large",
        ),
        # --- ok -----------------------------------------------------------------------------
        Case("one.png", encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"), "ok", size=(1, 1)),
        Case(
            "strip.png",
            encode(Image.new("L", (40000, 1), 128), "PNG"),
            "ok",
            size=(40000, 1),
        ),
        Case("photo.jpg", jpeg, "ok", size=(64, 48)),
        Case("gray16.png", encode(gray16, "PNG"), "ok", size=(32, 16), note_contains="16-bit"),
        Case(
            "cmyk.jpg",
            encode(cmyk_image(), "JPEG", quality=95),
            "ok",
            size=(32, 16),
            note_contains="cmyk converted to rgb",
        ),
        Case(
            "cmyk_icc.jpg",
            encode(cmyk_image(), "JPEG", quality=95, icc_profile=cmyk_profile()),
            "ok",
            size=(32, 16),
            note_contains="icc profile converted to srgb",
        ),
        Case(
            "wide_gamut.png",
            encode(red, "PNG", icc_profile=swapped_primaries_profile()),
            "ok",
            size=(8, 8),
            note_contains="icc profile converted to srgb",
        ),
        Case(
            "broken_icc.jpg",
            encode(red, "JPEG", icc_profile=b"definitely not an ICC profile" * 4),
            "ok",
            size=(8, 8),
            note_contains="icc profile ignored",
        ),
        Case(
            "palette_transparent.png",
            encode(palette_transparent(), "PNG", transparency=0),
            "ok",
            size=(16, 8),
            note_contains="alpha composited on white",
        ),
        Case("la.png", encode(la_image(), "PNG"), "ok", size=(16, 8), note_contains="alpha"),
        Case(
            "rgba.png",
            encode(Image.fromarray(rgba), "PNG"),
            "ok",
            size=(16, 8),
            note_contains="alpha",
        ),
        Case("bilevel.png", encode(Image.new("1", (9, 3), 1), "PNG"), "ok", size=(9, 3)),
        Case(
            "rotated.jpg",
            rotated_jpeg(6, (40, 20)),
            "ok",
            size=(20, 40),
            note_contains="exif orientation 6 applied",
        ),
        Case(
            "rotated.png",
            encode(noise_rgb(30, 10), "PNG", exif=rotated_png_exif.tobytes()),
            "ok",
            size=(10, 30),
            note_contains="orientation 8",
        ),
        Case(
            "gps.jpg",
            encode(photo, "JPEG", quality=90, exif=_gps_exif().tobytes()),
            "ok",
            size=(64, 48),
            note_contains="gps metadata removed",
        ),
        Case(
            "animated.gif",
            animated_gif(3),
            "ok",
            size=(12, 10),
            note_contains="animated: first of 3 frames",
        ),
        Case(
            "stereo.jpg",
            encode(photo, "MPO", save_all=True, append_images=[noise_rgb(64, 48, SEED + 1)]),
            "ok",
            size=(64, 48),
            note_contains="animated: first of 2 frames",
        ),
        Case("image.bmp", encode(photo, "BMP"), "ok", size=(64, 48)),
        Case("image.webp", encode(photo, "WEBP", quality=80), "ok", size=(64, 48)),
        Case("image.tif", encode(photo, "TIFF"), "ok", size=(64, 48)),
        Case("float.tif", encode(float_img, "TIFF"), "ok", size=(24, 8), note_contains="float"),
        Case("int32.tif", encode(int_img, "TIFF"), "ok", size=(24, 8), note_contains="32-bit"),
    ]
    if include_huge:
        cases.append(
            Case(
                "huge_gradient.png",
                fast_png(np.asarray(gradient_rgb(9000, 9000))),
                "ok",
                size=(9000, 9000),
            )
        )
    return cases


def write_corpus(folder: Path, include_huge: bool = False) -> list[Case]:
    """Write every case to ``folder/name`` (folder created if needed); returns the cases."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases = bad_corpus(include_huge=include_huge)
    for case in cases:
        (folder / case.name).write_bytes(case.data)
    return cases
