"""Tests for pipeline.decode: the bad-input corpus through decode_image and decode_batch,
batch pass-through, EXIF/GPS stripping, ICC conversion, modes and the pixel limit."""

from __future__ import annotations

import functools
import io
import os
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from pipeline import decode as decode_mod
from pipeline.decode import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    Decoded,
    DecodeError,
    DecodeOptions,
    decode_batch,
    decode_image,
)
from tests.corpus import (
    Case,
    bad_corpus,
    cmyk_image,
    cmyk_profile,
    encode,
    noise_rgb,
    png_with_declared_size,
    rotated_jpeg,
    srgb_profile,
    swapped_primaries_profile,
    write_corpus,
)


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[Case, ...]:
    return tuple(bad_corpus())


CASES = _corpus()


def _check_ok(case: Case, decoded: Decoded) -> None:
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.ndim == 3 and decoded.pixels.shape[2] == 3
    assert decoded.pixels.flags.c_contiguous
    assert decoded.pixels.shape[:2] == (decoded.height, decoded.width)
    if case.size is not None:
        assert (decoded.width, decoded.height) == case.size
    if case.note_contains is not None:
        assert case.note_contains.lower() in (decoded.note or "").lower()


def _batch(datas: list[object], **extra: list[object]) -> dict[str, np.ndarray]:
    n = len(datas)

    def obj(values: list[object]) -> np.ndarray:
        arr = np.empty(n, dtype=object)
        arr[:] = values
        return arr

    batch = {
        "key": obj([f"k{i}" for i in range(n)]),
        "data": obj(datas),
        "status": obj(["ok"] * n),
        "error": obj([None] * n),
        "note": obj([None] * n),
    }
    for name, values in extra.items():
        batch[name] = obj(values) if not isinstance(values, np.ndarray) else values
    return batch


# ------------------------------------------------------------------------------------------
# corpus


def test_corpus_is_deterministic_and_complete(tmp_path):
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    for required in (
        "empty.jpg",
        "truncated.jpg",
        "truncated.png",
        "wrong_magic.png",
        "notes.jpg",
        "bomb.png",
        "one.png",
        "strip.png",
        "gray16.png",
        "cmyk.jpg",
        "palette_transparent.png",
        "la.png",
        "rotated.jpg",
        "gps.jpg",
        "animated.gif",
        "image.bmp",
        "image.webp",
        "image.tif",
    ):
        assert required in names
    assert all(c.expect in ("ok", "error") for c in CASES)
    again = bad_corpus()
    assert [(c.name, c.expect) for c in again] == [(c.name, c.expect) for c in CASES]
    # LittleCMS stamps profiles it builds with the current time: those bytes may differ
    stable = [i for i, c in enumerate(CASES) if b"ICC" not in c.data and b"acsp" not in c.data]
    assert [again[i].data for i in stable] == [CASES[i].data for i in stable]
    assert len(png_with_declared_size(40000, 40000)) < 200
    written = write_corpus(tmp_path / "corpus")
    for case in written:
        assert (tmp_path / "corpus" / case.name).read_bytes() == case.data


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_decode_image_corpus(case: Case):
    if case.expect == "error":
        with pytest.raises(DecodeError) as info:
            decode_image(case.data)
        message = str(info.value)
        assert case.error_contains is not None
        assert case.error_contains.lower() in message.lower()
        assert "\n" not in message
    else:
        _check_ok(case, decode_image(case.data))


def test_decode_batch_corpus():
    batch = _batch([c.data for c in CASES], extra=[f"x{i}" for i in range(len(CASES))])
    out = decode_batch(batch)

    assert "data" not in out
    assert {"key", "status", "error", "note", "pixels", "width", "height", "exif", "extra"} <= set(
        out
    )
    n = len(CASES)
    for name, column in out.items():
        assert len(column) == n, name
        assert column.ndim == 1, name
    assert out["width"].dtype == np.int64 and out["height"].dtype == np.int64
    assert out["pixels"].dtype == object and out["exif"].dtype == object
    assert out["extra"] is batch["extra"]
    assert list(out["key"]) == [f"k{i}" for i in range(n)]

    for i, case in enumerate(CASES):
        assert out["status"][i] == case.expect, (case.name, out["error"][i])
        if case.expect == "error":
            assert case.error_contains.lower() in out["error"][i].lower(), case.name
            assert out["pixels"][i] is None and out["exif"][i] is None
            assert out["width"][i] == 0 and out["height"][i] == 0
            continue
        assert out["error"][i] is None
        width, height = int(out["width"][i]), int(out["height"][i])
        if case.size is not None:
            assert (width, height) == case.size, case.name
        if case.note_contains is not None:
            assert case.note_contains.lower() in (out["note"][i] or "").lower(), case.name
        single = decode_image(case.data)
        assert out["pixels"][i] == single.pixels.tobytes(), case.name
        assert len(out["pixels"][i]) == width * height * 3
        assert out["exif"][i] == single.exif
        assert out["note"][i] == single.note


# ------------------------------------------------------------------------------------------
# decode_batch contract


def test_batch_passes_through_error_and_non_item_rows():
    good = encode(noise_rgb(8, 4), "PNG")
    batch = _batch(
        [good, None, good, good],
        kind=["item", "item", "manifest", "item"],
        size=np.array([10, 20, 30, 40], dtype=np.int64),
    )
    batch["status"][1] = "error"
    batch["error"][1] = "listing: access denied"
    batch["note"][3] = "from listing"
    out = decode_batch(batch)

    assert list(out["status"]) == ["ok", "error", "ok", "ok"]
    assert list(out["error"]) == [None, "listing: access denied", None, None]
    assert out["kind"] is batch["kind"] and out["size"] is batch["size"]
    # row 1 (error) and row 2 (kind != "item") untouched, new columns empty
    for i in (1, 2):
        assert out["pixels"][i] is None and out["exif"][i] is None
        assert out["width"][i] == 0 and out["height"][i] == 0
    assert out["note"][2] is None
    assert out["width"][0] == 8 and out["height"][0] == 4
    assert out["note"][3] == "from listing"  # nothing to add, previous note kept
    # the input batch is not modified
    assert list(batch["status"]) == ["ok", "error", "ok", "ok"]
    assert "pixels" not in batch and "data" in batch


def test_batch_appends_notes_and_keeps_1d_object_columns():
    same = encode(Image.new("LA", (4, 4), (10, 128)), "PNG")
    batch = _batch([same, same])
    batch["note"][0] = "from listing"
    out = decode_batch(batch)
    assert out["pixels"].shape == (2,) and out["pixels"].dtype == object
    assert isinstance(out["pixels"][0], bytes) and out["pixels"][0] == out["pixels"][1]
    assert out["note"][0] == "from listing; alpha composited on white"
    assert out["note"][1] == "alpha composited on white"


def test_batch_with_numpy_string_columns_and_readonly_arrays():
    png = encode(noise_rgb(3, 2), "PNG")
    batch = _batch([png, b"junk"])
    batch["status"] = np.array(["ok", "ok"])  # '<U2', as Ray may hand strings back
    batch["kind"] = np.array(["item", "item"])
    for column in batch.values():
        column.flags.writeable = False  # zero-copy Arrow views are read-only
    out = decode_batch(batch)
    assert list(out["status"]) == ["ok", "error"]
    assert all(type(s) is str for s in out["status"])
    assert "not a supported image" in out["error"][1]


def test_batch_unexpected_exception_becomes_error_row(monkeypatch):
    def boom(img, icc, notes):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(decode_mod, "_to_rgb", boom)
    out = decode_batch(_batch([encode(noise_rgb(3, 2), "PNG"), b""]))
    assert list(out["status"]) == ["error", "error"]
    assert out["error"][0] == "RuntimeError: kaboom second line"
    assert out["error"][1] == "empty file"


def test_batch_empty_and_odd_data_types():
    out = decode_batch(_batch([]))
    assert all(len(column) == 0 for column in out.values())
    assert out["width"].dtype == np.int64 and "data" not in out

    png = encode(noise_rgb(3, 2), "PNG")
    out = decode_batch(_batch([bytearray(png), memoryview(png), np.frombuffer(png, np.uint8), 7]))
    assert list(out["status"]) == ["ok", "ok", "ok", "error"]
    assert out["error"][3] == "data must be bytes, got int"


# ------------------------------------------------------------------------------------------
# EXIF


def test_exif_orientation_applied_like_pillow():
    data = rotated_jpeg(6, (40, 20))
    decoded = decode_image(data)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert (decoded.width, decoded.height) == (20, 40)
    np.testing.assert_array_equal(decoded.pixels, np.asarray(expected))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_round_trip_strips_orientation_and_gps(fmt):
    decoded = decode_image(rotated_jpeg(6, (40, 20)))
    assert decoded.exif is not None and decoded.exif.startswith(b"Exif\x00\x00")
    assert "GPS metadata removed" in decoded.note

    saved = encode(Image.fromarray(decoded.pixels), fmt, exif=decoded.exif)
    with Image.open(io.BytesIO(saved)) as back:
        back.load()
        exif = back.getexif()
        assert 0x0112 not in exif
        assert 0x8825 not in exif
        assert exif.get_ifd(0x8825) == {}
        assert exif[0x010F] == "TestMake" and exif[0x0110] == "TestModel"
        assert exif.get_ifd(0x8769)[0x9003] == "2024:01:02 03:04:05"
        assert back.size == (20, 40)  # a viewer applying EXIF would not rotate it again


def test_exif_none_when_absent_or_only_stripped_tags():
    assert decode_image(encode(noise_rgb(4, 4), "JPEG")).exif is None
    only_orientation = Image.Exif()
    only_orientation[0x0112] = 3
    decoded = decode_image(encode(noise_rgb(4, 2), "JPEG", exif=only_orientation.tobytes()))
    assert decoded.exif is None
    assert decoded.note == "EXIF orientation 3 applied"
    assert decode_image(encode(noise_rgb(4, 4), "TIFF")).exif is None  # TIFF structure tags


def test_output_exif_drops_gps_even_if_its_ifd_was_loaded():
    exif = Image.Exif()
    exif.load(Image.open(io.BytesIO(rotated_jpeg())).info["exif"])
    assert exif.get_ifd(0x8825)  # now cached inside the Exif object
    notes: list[str] = []
    out = decode_mod._output_exif(exif, notes)
    back = Image.Exif()
    back.load(out)
    assert 0x8825 not in back and back.get_ifd(0x8825) == {}
    assert 0x0112 not in back and back[0x010F] == "TestMake"


def test_broken_exif_does_not_fail_the_row():
    data = bytearray(rotated_jpeg())
    start = data.index(b"Exif\x00\x00")
    data[start + 6 : start + 40] = b"\xff" * 34  # garbage TIFF header / IFD
    decoded = decode_image(bytes(data))
    assert decoded.pixels.shape == (20, 40, 3)  # orientation unreadable -> stored size


# ------------------------------------------------------------------------------------------
# ICC


def test_srgb_profile_leaves_pixels_unchanged():
    img = noise_rgb(16, 8)
    decoded = decode_image(encode(img, "PNG", icc_profile=srgb_profile()))
    np.testing.assert_array_equal(decoded.pixels, np.asarray(img))
    assert decoded.note is None


def test_non_srgb_profile_is_converted():
    arr = np.zeros((2, 3, 3), dtype=np.uint8)
    arr[:, 0] = (255, 0, 0)
    arr[:, 1] = (0, 0, 255)
    arr[:, 2] = (0, 255, 0)
    decoded = decode_image(
        encode(Image.fromarray(arr), "PNG", icc_profile=swapped_primaries_profile())
    )
    assert decoded.note == "ICC profile converted to sRGB"
    np.testing.assert_allclose(decoded.pixels[0, 0], (0, 0, 255), atol=2)
    np.testing.assert_allclose(decoded.pixels[0, 1], (255, 0, 0), atol=2)
    np.testing.assert_allclose(decoded.pixels[0, 2], (0, 255, 0), atol=2)


def test_broken_profile_is_ignored_with_note():
    img = noise_rgb(8, 8)
    plain = decode_image(encode(img, "PNG"))
    decoded = decode_image(encode(img, "PNG", icc_profile=b"\x00garbage" * 20))
    np.testing.assert_array_equal(decoded.pixels, plain.pixels)
    assert decoded.note.startswith("ICC profile ignored: ")


def test_profile_for_wrong_colour_space_is_ignored():
    decoded = decode_image(encode(Image.new("L", (4, 4), 77), "PNG", icc_profile=srgb_profile()))
    assert "ICC profile ignored" in decoded.note
    assert decoded.pixels[0, 0].tolist() == [77, 77, 77]


def test_cmyk_jpeg_with_embedded_profile():
    decoded = decode_image(encode(cmyk_image(), "JPEG", quality=95, icc_profile=cmyk_profile()))
    assert decoded.note == "CMYK converted to RGB; ICC profile converted to sRGB"
    row = decoded.pixels[8]
    assert min(row[2].tolist()) >= 245  # no ink -> white
    assert max(row[30].tolist()) <= 10  # K -> black
    r, g, b = row[12].tolist()  # cyan band
    assert r < 120 and g > 200 and b > 200
    r, g, b = row[20].tolist()  # magenta band
    assert g < 120 and r > 200 and b > 150


# ------------------------------------------------------------------------------------------
# modes


def _rgb(img: Image.Image, icc: bytes | None = None) -> tuple[np.ndarray, list[str]]:
    notes: list[str] = []
    out = decode_mod._to_rgb(img, icc, notes)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out), notes


@pytest.mark.parametrize(
    "mode,note",
    [
        ("1", None),
        ("L", None),
        ("P", None),
        ("RGB", None),
        ("RGBX", None),
        ("YCbCr", None),
        ("LAB", None),
        ("HSV", None),
        ("PA", "alpha composited on white"),
        ("LA", "alpha composited on white"),
        ("La", "alpha composited on white"),
        ("RGBA", "alpha composited on white"),
        ("RGBa", "alpha composited on white"),
        ("CMYK", "CMYK converted to RGB"),
        ("I;16", "16-bit scaled to 8-bit"),
        ("I;16L", "16-bit scaled to 8-bit"),
        ("I;16B", "16-bit scaled to 8-bit"),
        ("I;16N", "16-bit scaled to 8-bit"),
        ("I", "16-bit scaled to 8-bit"),
        ("F", "float image scaled to 8-bit"),
    ],
)
def test_every_documented_mode_converts(mode, note):
    _pixels, notes = _rgb(Image.new(mode, (3, 2)))
    assert notes == ([note] if note else [])


def test_sixteen_bit_scaling_rounds():
    values = np.array([[0, 128, 32768, 65535]], dtype=np.uint16)
    for mode in ("I;16", "I;16B"):
        img = Image.frombytes(
            mode, (4, 1), values.astype("<u2" if mode == "I;16" else ">u2").tobytes()
        )
        pixels, _ = _rgb(img)
        assert pixels[0, :, 0].tolist() == [0, 0, 128, 255]
    pixels, notes = _rgb(Image.fromarray(values.astype(np.int32)))
    assert pixels[0, :, 0].tolist() == [0, 0, 128, 255] and notes == ["16-bit scaled to 8-bit"]


def test_wide_int_and_float_scaling():
    pixels, notes = _rgb(Image.fromarray(np.array([[-10, 0, 245, 70000]], dtype=np.int32)))
    assert pixels[0, :, 0].tolist() == [0, 0, 1, 255]
    assert notes == ["32-bit integer scaled to 8-bit (range -10..70000)"]
    unit = np.array([[0.0, 0.5, 1.0, -0.2, np.nan]], dtype=np.float32)
    assert _rgb(Image.fromarray(unit))[0][0, :, 0].tolist() == [0, 128, 255, 0, 0]
    wide = np.array([[0.0, 100.4, 300.0, -5.0]], dtype=np.float32)
    assert _rgb(Image.fromarray(wide))[0][0, :, 0].tolist() == [0, 100, 255, 0]


def test_alpha_compositing_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 0, 0, 0), (200, 0, 0, 255), (200, 0, 0, 128)])
    pixels, _ = _rgb(rgba)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 1].tolist() == [200, 0, 0]
    assert pixels[0, 2].tolist() == pytest.approx([227, 127, 127], abs=1)
    palette = Image.open(io.BytesIO(next(c.data for c in CASES if c.name.startswith("palette"))))
    pixels, _ = _rgb(palette)
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 15].tolist() == [0, 255, 0]


# ------------------------------------------------------------------------------------------
# pixel limit, formats, global state


def test_pixel_limit_option_and_no_escaping_warnings():
    data = encode(noise_rgb(64, 48), "PNG")  # 3072 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping decode_image would raise here
        for limit in (1000, 2000, 3071):  # Pillow error (>2x), Pillow warning, our check
            with pytest.raises(DecodeError, match=r"^image too large: 64x48 = 3072 pixels > limit"):
                decode_image(data, DecodeOptions(max_pixels=limit))
        assert decode_image(data, DecodeOptions(max_pixels=3072)).width == 64
        with pytest.raises(DecodeError, match="too large"):
            decode_image(png_with_declared_size(12000, 9000))
    out = decode_batch(_batch([data]), DecodeOptions(max_pixels=1000))
    assert out["status"][0] == "error" and "limit 1000" in out["error"][0]


def test_global_pillow_state_is_left_alone():
    before = Image.MAX_IMAGE_PIXELS
    decode_image(encode(noise_rgb(4, 4), "PNG"), DecodeOptions(max_pixels=10**9))
    with pytest.raises(DecodeError):
        decode_image(png_with_declared_size(40000, 40000), DecodeOptions(max_pixels=50))
    assert Image.MAX_IMAGE_PIXELS == before
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_format_allow_list():
    jpeg = encode(noise_rgb(8, 8), "JPEG")
    with pytest.raises(DecodeError, match="format JPEG is not allowed"):
        decode_image(jpeg, DecodeOptions(formats=("png",)))
    mpo = next(c.data for c in CASES if c.name == "stereo.jpg")
    assert decode_image(mpo, DecodeOptions(formats=("MPO",))).format == "MPO"
    with pytest.raises(DecodeError, match="format MPO is not allowed"):
        decode_image(mpo, DecodeOptions(formats=("JPEG",)))
    assert decode_image(jpeg).format == "JPEG"


def test_options_validation():
    assert DecodeOptions().max_pixels == DEFAULT_MAX_PIXELS
    assert DecodeOptions().formats == ALLOWED_FORMATS
    assert set(ALLOWED_FORMATS) == {"JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "MPO"}
    with pytest.raises(ValueError):
        DecodeOptions(max_pixels=0)
    with pytest.raises(ValueError):
        DecodeOptions(formats=())
    with pytest.raises(ValueError, match="NOPE"):
        DecodeOptions(formats=("PNG", "nope"))
    assert hash(DecodeOptions()) == hash(DecodeOptions())


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("AEJOB_HUGE_TESTS"), reason="set AEJOB_HUGE_TESTS=1 (81 MP image, ~10 s)"
)
def test_huge_but_valid_image():
    case = next(c for c in bad_corpus(include_huge=True) if c.name == "huge_gradient.png")
    decoded = decode_image(case.data)
    assert (decoded.width, decoded.height) == case.size == (9000, 9000)
    assert decoded.pixels[0, 0].tolist() == [0, 0, 0]
    assert decoded.pixels[-1, -1].tolist() == [255, 255, 255]
