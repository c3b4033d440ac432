"""The Arrow schemas of DST's data files, one per job (the README's column list)."""

from __future__ import annotations

import pyarrow as pa

from models.regions import FIELD_META_KEY, REGION_COLUMN, REGIONS, RegionSpec

HEAD = [("key", pa.string()), ("source_uri", pa.string()), ("status", pa.string()), ("error", pa.string())]
SOURCE = [("source_sha256", pa.string()), ("source_bytes", pa.int64())]
TAIL = [("model", pa.string()), ("checkpoint_sha256", pa.string()),
        ("run_id", pa.string())]  # run_id: the run that wrote the row


def _embedding(embedding_dim: int) -> list[tuple[str, pa.DataType] | pa.Field]:
    return [("embedding", pa.list_(pa.float32(), embedding_dim)), region_field(embedding_dim),
            ("embedding_model", pa.string())]


def region_field(embedding_dim: int, spec: RegionSpec = REGIONS) -> pa.Field:
    """``region_embeddings``: the embedder's vectors of ``spec.count`` windows of the image
    (``models/regions.py``), null where ``embedding`` is; the layout rides in the field's metadata."""
    return pa.field(REGION_COLUMN, pa.list_(pa.list_(pa.float32(), embedding_dim), spec.count),
                    metadata={FIELD_META_KEY: spec.layout_id().encode()})


def clean_schema(embedding_dim: int) -> pa.Schema:
    return pa.schema([
        *HEAD,
        ("note", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.large_binary()),
        ("image_format", pa.string()),
        *_embedding(embedding_dim),
        ("noise_sigma", pa.float32()),
        *SOURCE,
        *TAIL,
    ])


def compress_schema(embedding_dim: int) -> pa.Schema:
    return pa.schema([
        *HEAD,
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("latent", pa.large_binary()),
        ("bpp", pa.float64()),
        ("psnr", pa.float64()),
        ("quality", pa.int32()),  # the rung coded at (fixed or rate-controlled); null: error or original
        ("codec", pa.string()),
        ("note", pa.string()),
        *SOURCE,
        *_embedding(embedding_dim),
        *TAIL,
    ])


def embedding_info(embedder_ref: str) -> tuple[str, str, int]:
    """(checkpoint path, ``embedding_model`` id, dimension) of an embedder checkpoint, from its
    JSON sidecar (the id is what ``models.embedder.EmbedderEngine.model_id`` stores)."""
    from models import checkpoint

    path = checkpoint.resolve(embedder_ref)
    meta = checkpoint.read_meta(path)
    return str(path), f"{meta['name']}:{meta['sha256'][:12]}", int(meta["config"]["dim"])
