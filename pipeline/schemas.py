"""The Arrow schemas of DST's data files, one per job (the README's column list)."""

from __future__ import annotations

import pyarrow as pa


def _common_tail(embedding_dim: int) -> list[tuple[str, pa.DataType]]:
    return [
        ("embedding", pa.list_(pa.float32(), embedding_dim)),
        ("embedding_model", pa.string()),
    ]


def clean_schema(embedding_dim: int) -> pa.Schema:
    return pa.schema([
        ("key", pa.string()),
        ("source_uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("note", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.large_binary()),
        ("image_format", pa.string()),
        *_common_tail(embedding_dim),
        ("noise_sigma", pa.float32()),
        ("source_sha256", pa.string()),
        ("source_bytes", pa.int64()),
        ("model", pa.string()),
        ("checkpoint_sha256", pa.string()),
        ("run_id", pa.string()),  # the run that wrote the row
    ])


def compress_schema(embedding_dim: int) -> pa.Schema:
    return pa.schema([
        ("key", pa.string()),
        ("source_uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("latent", pa.large_binary()),
        ("bpp", pa.float64()),
        ("psnr", pa.float64()),
        ("codec", pa.string()),
        ("note", pa.string()),
        ("source_sha256", pa.string()),
        ("source_bytes", pa.int64()),
        *_common_tail(embedding_dim),
        ("model", pa.string()),
        ("checkpoint_sha256", pa.string()),
        ("run_id", pa.string()),  # the run that wrote the row
    ])


def embedding_info(embedder_ref: str) -> tuple[str, str, int]:
    """(checkpoint path, ``embedding_model`` id, dimension) of an embedder checkpoint, from its
    JSON sidecar (the id is what ``models.embedder.EmbedderEngine.model_id`` stores)."""
    from models import checkpoint

    path = checkpoint.resolve(embedder_ref)
    meta = checkpoint.read_meta(path)
    return str(path), f"{meta['name']}:{meta['sha256'][:12]}", int(meta["config"]["dim"])
