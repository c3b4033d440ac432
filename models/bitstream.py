"""The aejob codec file format: a small self-describing header, then the entropy-coded payload.

Layout (big-endian)::

    magic        4s   b"AEJB"
    version      B    FORMAT_VERSION
    name_len     B    length of the model name
    name         *s   registry name of the model (ASCII)
    sha256       8s   first 8 bytes of the checkpoint's sha256 (the decoder must load the same)
    quality      B    1..N
    width        I    original image width
    height       I    original image height
    pad_bottom   H    rows added before encoding (cropped on decode)
    pad_right    H    columns added before encoding
    latent       3H   latent shape C, h, w
    payload_len  I    bytes of entropy-coded payload that follow
    crc32        I    zlib.crc32 of everything before this field plus the payload

Any truncated, extended or corrupted stream raises :class:`BitstreamError` (a ``ValueError``)
from :func:`unpack` before a single symbol is decoded.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"AEJB"
FORMAT_VERSION = 1
SHA_PREFIX_BYTES = 8
MAX_LATENT_ELEMENTS = 1 << 26  # refuse absurd shapes (≈ PIL's 89 MP limit at 192 channels)

_HEAD = struct.Struct(">4sBB")
_BODY = struct.Struct(">8sBIIHH3HI")
_CRC = struct.Struct(">I")


class BitstreamError(ValueError):
    """A stream that is not a valid aejob codec stream (truncated, corrupted, mismatched)."""


@dataclass(frozen=True)
class Header:
    model: str
    sha256_prefix: bytes  # SHA_PREFIX_BYTES bytes
    quality: int
    width: int
    height: int
    pad_bottom: int
    pad_right: int
    latent_shape: tuple[int, int, int]

    @staticmethod
    def sha_prefix(sha256_hex: str) -> bytes:
        """The header's checkpoint id from a hex sha256 (zeros for an unsaved model)."""
        if not sha256_hex:
            return bytes(SHA_PREFIX_BYTES)
        try:
            raw = bytes.fromhex(sha256_hex[: 2 * SHA_PREFIX_BYTES])
        except ValueError:
            raise ValueError(f"not a hex sha256: {sha256_hex!r}") from None
        if len(raw) != SHA_PREFIX_BYTES:
            raise ValueError(f"sha256 too short: {sha256_hex!r}")
        return raw


def pack(header: Header, payload: bytes) -> bytes:
    name = header.model.encode("ascii")
    if not 0 < len(name) < 256:
        raise ValueError(f"model name must be 1..255 ASCII bytes: {header.model!r}")
    if len(header.sha256_prefix) != SHA_PREFIX_BYTES:
        raise ValueError(f"sha256 prefix must be {SHA_PREFIX_BYTES} bytes")
    try:
        body = _BODY.pack(
            header.sha256_prefix, header.quality, header.width, header.height,
            header.pad_bottom, header.pad_right, *header.latent_shape, len(payload),
        )
    except struct.error as e:
        raise ValueError(f"header field out of range: {e}") from e
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, len(name)) + name + body
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + _CRC.pack(crc) + payload


def unpack(data: bytes) -> tuple[Header, bytes]:
    """Parse and verify a stream; returns the header and the payload."""
    data = bytes(data)
    if len(data) < _HEAD.size:
        raise BitstreamError(f"truncated stream: {len(data)} bytes is shorter than any header")
    magic, version, name_len = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise BitstreamError(f"not an aejob codec stream (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise BitstreamError(
            f"unsupported stream format version {version} (this reads {FORMAT_VERSION})")
    fixed = _HEAD.size + name_len + _BODY.size + _CRC.size
    if len(data) < fixed:
        raise BitstreamError(f"truncated stream: {len(data)} bytes, header alone needs {fixed}")
    try:
        name = data[_HEAD.size : _HEAD.size + name_len].decode("ascii")
    except UnicodeDecodeError:
        raise BitstreamError("corrupted stream: model name is not ASCII") from None
    off = _HEAD.size + name_len
    sha, quality, width, height, pad_b, pad_r, c, h, w, payload_len = _BODY.unpack_from(data, off)
    (crc,) = _CRC.unpack_from(data, off + _BODY.size)
    if len(data) != fixed + payload_len:
        what = "truncated" if len(data) < fixed + payload_len else "trailing bytes after"
        raise BitstreamError(
            f"{what} stream: header announces {payload_len} payload bytes, "
            f"got {len(data) - fixed}"
        )
    payload = data[fixed:]
    if zlib.crc32(payload, zlib.crc32(data[: off + _BODY.size])) != crc:
        raise BitstreamError("corrupted stream: CRC32 mismatch")
    if width < 1 or height < 1 or c < 1 or c * h * w > MAX_LATENT_ELEMENTS:
        raise BitstreamError(f"invalid sizes in header: image {width}x{height}, latent {c}x{h}x{w}")
    header = Header(name, sha, quality, width, height, pad_b, pad_r, (c, h, w))
    return header, payload


def unpack_for(data: bytes, model: str, num_qualities: int, sha256: str | None = None) -> tuple[Header, bytes]:
    """``unpack``, then check that the stream is ``model``'s, made with the checkpoint of
    ``sha256`` (when given) at one of its ``num_qualities`` rungs."""
    header, payload = unpack(data)
    if header.model != model:
        raise BitstreamError(f"stream was made by model {header.model!r}, not {model!r}")
    if sha256 is not None and header.sha256_prefix != Header.sha_prefix(sha256):
        raise BitstreamError(
            f"stream was encoded with checkpoint {header.sha256_prefix.hex()}…, "
            f"but the loaded checkpoint is {sha256[:16]}…: decode with the same checkpoint")
    if not 1 <= header.quality <= num_qualities:
        raise BitstreamError(f"quality {header.quality} not in 1..{num_qualities}")
    return header, payload
