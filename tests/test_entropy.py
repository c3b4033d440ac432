"""Integer-table entropy coding: golden bitstreams, escapes, corruption, table building."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from models import bitstream
from models.entropy import (
    EntropyCodingError,
    EntropyTables,
    FactorizedDensity,
    build_tables,
    decode_symbols,
    encode_symbols,
    quantize_pmf,
)


def golden_tables() -> EntropyTables:
    # row 0: values -2..1 (+ escape); row 1: values 0..1 (+ escape with the minimum 1/65536)
    f0 = [4096, 20000, 30000, 11000, 440]
    f1 = [60000, 5535, 1]
    cdf = np.full((2, 6), 1 << 16)
    cdf[0] = np.concatenate([[0], np.cumsum(f0)])
    cdf[1, :4] = np.concatenate([[0], np.cumsum(f1)])
    return EntropyTables(cdf, lengths=[4, 2], offsets=[-2, 0], precision=16)


GOLDEN_SYMBOLS = np.array(
    [[[0, 1, -1, -2], [1, 0, 7, 0], [-5, 1, 0, 0]],
     [[0, 0, 1, 0], [0, -1, 0, 0], [300, 0, 1, 0]]], np.int32)
# constriction 0.5.0 RangeEncoder, 24-bit models built exactly from the tables above.
GOLDEN_HEX = "a67872c0cf4cb38d646b875f540cf9a7"
GOLDEN_ZEROS_HEX = "096d92ad"


def test_golden_bitstream_exact_bytes_and_back() -> None:
    t = golden_tables()
    data = encode_symbols(GOLDEN_SYMBOLS, t)
    assert data.hex() == GOLDEN_HEX
    out = decode_symbols(data, t, GOLDEN_SYMBOLS.shape)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, GOLDEN_SYMBOLS)
    zeros = np.zeros((2, 3, 4), np.int32)
    assert encode_symbols(zeros, t).hex() == GOLDEN_ZEROS_HEX
    np.testing.assert_array_equal(decode_symbols(bytes.fromhex(GOLDEN_ZEROS_HEX), t, zeros.shape), zeros)


def test_tables_survive_tensor_round_trip_bit_exactly() -> None:
    t = golden_tables()
    t2 = EntropyTables.from_tensors(t.to_tensors())
    np.testing.assert_array_equal(t2.cdf, t.cdf)
    assert encode_symbols(GOLDEN_SYMBOLS, t2).hex() == GOLDEN_HEX


def test_constriction_uses_exactly_the_integer_probabilities() -> None:
    """n copies of a symbol cost n·log2(2**16 / f) bits (+ coder overhead): a model built from
    the floats f/65536 with constriction's 24-bit minimum would cost 24 bits per escape."""
    t = golden_tables()
    n = 200
    sym = np.full((2, 1, n), 0, np.int32)
    sym[1] = 5  # escapes of row 1 (f = 1): 16 bits each, plus their Exp-Golomb suffix
    sym[0] = 1  # row 0 value 1 -> symbol 3 (f = 11000)
    bits = len(encode_symbols(sym, t)) * 8
    # escaped value 5: distance 3 beyond the table -> zigzag 6 -> u = 7: n = 2 (Uniform(23)) + 2 bits
    expected = n * (np.log2(65536 / 11000) + 16 + np.log2(23) + 2)
    assert expected <= bits <= expected + 64
    np.testing.assert_array_equal(decode_symbols(encode_symbols(sym, t), t, sym.shape), sym)


@pytest.mark.parametrize("value", [2, 3, 100, -3, -4, -1000, 2**20, -(2**20)])
def test_escape_path_round_trips_far_values(value: int) -> None:
    t = golden_tables()
    sym = np.zeros((2, 2, 3), np.int32)
    sym[0, 1, 2] = value
    sym[1, 0, 0] = -value
    out = decode_symbols(encode_symbols(sym, t), t, sym.shape)
    np.testing.assert_array_equal(out, sym)


def test_random_symbols_with_many_escapes_round_trip() -> None:
    rng = np.random.default_rng(0)
    t = golden_tables()
    sym = rng.integers(-40, 40, size=(2, 9, 11)).astype(np.int32)
    np.testing.assert_array_equal(decode_symbols(encode_symbols(sym, t), t, sym.shape), sym)


def test_values_beyond_the_escape_range_raise() -> None:
    sym = np.zeros((2, 1, 1), np.int32)
    sym[0, 0, 0] = 2**23
    with pytest.raises(EntropyCodingError, match="too far outside"):
        encode_symbols(sym, golden_tables())


def test_shape_mismatch_and_partial_words_raise() -> None:
    t = golden_tables()
    with pytest.raises(EntropyCodingError):
        encode_symbols(np.zeros((3, 2, 2), np.int32), t)
    data = encode_symbols(GOLDEN_SYMBOLS, t)
    with pytest.raises(ValueError):
        decode_symbols(data[:-1], t, GOLDEN_SYMBOLS.shape)
    with pytest.raises(ValueError):
        decode_symbols(data, t, (5, 3, 4))


def test_corrupted_payload_never_crashes() -> None:
    """Without the container's CRC a flipped bit may decode to other symbols, but it must
    either do that (right shape, int32) or raise a ValueError."""
    t = golden_tables()
    data = bytearray(encode_symbols(GOLDEN_SYMBOLS, t))
    for i in range(len(data) * 8):
        bad = bytearray(data)
        bad[i // 8] ^= 1 << (i % 8)
        try:
            out = decode_symbols(bytes(bad), t, GOLDEN_SYMBOLS.shape)
        except ValueError:
            continue
        assert out.shape == GOLDEN_SYMBOLS.shape and out.dtype == np.int32


def _stream() -> bytes:
    header = bitstream.Header("factorized-codec", bytes(range(8)), 3, 17, 33, 15, 15, (2, 3, 4))
    return bitstream.pack(header, encode_symbols(GOLDEN_SYMBOLS, golden_tables()))


def test_container_round_trip_and_known_checksum() -> None:
    data = _stream()
    header, payload = bitstream.unpack(data)
    assert header.model == "factorized-codec" and header.quality == 3
    assert (header.width, header.height, header.latent_shape) == (17, 33, (2, 3, 4))
    assert payload.hex() == GOLDEN_HEX
    assert data[:4] == b"AEJB" and data == _stream()
    head = data[: len(data) - len(payload) - 4]
    assert int.from_bytes(data[len(head) : len(head) + 4], "big") == zlib.crc32(payload, zlib.crc32(head))


def test_container_truncation_and_bit_flips_raise_bitstream_error() -> None:
    data = _stream()
    for n in range(len(data)):
        with pytest.raises(bitstream.BitstreamError):
            bitstream.unpack(data[:n])
    with pytest.raises(bitstream.BitstreamError, match="trailing"):
        bitstream.unpack(data + b"\0")
    for i in range(len(data) * 8):
        bad = bytearray(data)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(bitstream.BitstreamError):
            bitstream.unpack(bytes(bad))
    assert issubclass(bitstream.BitstreamError, ValueError)


def test_quantize_pmf_sums_and_floors() -> None:
    rng = np.random.default_rng(1)
    for n in (2, 3, 50, 2000):
        pmf = rng.random(n) ** 8
        pmf[0] = 0.0
        f = quantize_pmf(pmf, 16)
        assert f.sum() == 1 << 16 and f.min() >= 1 and len(f) == n


def test_invalid_tables_are_rejected() -> None:
    with pytest.raises(EntropyCodingError):
        EntropyTables(np.array([[0, 10, 10, 65536]]), [2], [0], 16)  # zero-probability symbol
    with pytest.raises(EntropyCodingError):
        EntropyTables(np.array([[0, 10, 20, 65535]]), [2], [0], 16)  # does not reach 2**16
    with pytest.raises(EntropyCodingError):
        EntropyTables.from_tensors({})


def test_density_likelihoods_and_tables() -> None:
    torch.manual_seed(0)
    d = FactorizedDensity(4, groups=2, filters=(3, 3))
    grid = torch.arange(-200, 201, dtype=torch.float32)
    z = grid.reshape(1, 1, 1, -1).expand(2, 4, 1, -1).contiguous()
    lik = d.likelihood(z, torch.tensor([0, 1]))
    total = lik.sum(dim=(2, 3))
    assert torch.allclose(total, torch.ones_like(total), atol=1e-3)
    t = build_tables(d, tail_mass=1e-9, max_half_range=64)
    assert t.rows == 8 and t.medians.shape == (8,) and int(t.lengths.max()) <= 129
    rng = np.random.default_rng(2)
    rows = t.select(4, 8)
    sym = rng.integers(-70, 70, size=(4, 5, 6)).astype(np.int32)
    np.testing.assert_array_equal(decode_symbols(encode_symbols(sym, rows), rows, sym.shape), sym)
