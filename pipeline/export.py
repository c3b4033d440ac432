"""Writing dataset rows back out as files: ``DIR/<key>`` with the extension replaced.

Two keys that would map to the same file (``a.jpg`` and ``a.png`` → ``a.png``) keep their
original extension in front (``a.jpg.png``, ``a.png.png``). Keys are untrusted: absolute paths,
``..`` components and empty names are refused, so nothing is written outside DIR.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.dataset as pads

from pipeline import storage

log = logging.getLogger(__name__)


class UnsafeKey(ValueError):
    pass


def safe_relpath(key: str) -> str:
    """A key as a relative POSIX path that stays inside the output folder, or UnsafeKey."""
    k = key.replace("\\", "/")
    if k.startswith("/") or (len(k) > 1 and k[1] == ":"):
        raise UnsafeKey(f"absolute path in key {key!r}")
    parts = [p for p in k.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise UnsafeKey(f"key {key!r} would escape the output folder")
    if any("\x00" in p for p in parts):
        raise UnsafeKey(f"NUL byte in key {key!r}")
    return "/".join(parts)


def _strip_ext(path: str) -> str:
    root, ext = posixpath.splitext(path)
    return root if ext and "/" not in ext else path


def output_names(keys: Iterable[str], ext: str) -> dict[str, str]:
    """key → relative output path with ``ext`` ('.png'), collisions resolved as documented."""
    safe = {k: safe_relpath(k) for k in keys}
    plain = {k: _strip_ext(p) + ext for k, p in safe.items()}
    clashes = Counter(v.lower() for v in plain.values())
    return {k: (safe[k] + ext if clashes[plain[k].lower()] > 1 else plain[k]) for k in safe}


def dataset(dst: str) -> pads.Dataset:
    fs, path = storage.resolve(dst)
    return pads.dataset(path, filesystem=fs, format="parquet")


def iter_rows(dst: str, columns: list[str], batch_rows: int = 64) -> Iterator[dict[str, object]]:
    for rb in dataset(dst).to_batches(columns=columns, batch_size=batch_rows):
        yield from rb.to_pylist()


def export_images(
    dst: str, out: str, image_column: str = "image", format_column: str = "image_format"
) -> dict[str, int]:
    """Write every ok row's image bytes to ``out``; returns counts."""
    from pipeline.encode import EXTENSIONS

    keys = dataset(dst).to_table(columns=["key", "status", format_column]).to_pylist()
    counts = {"written": 0, "skipped_error_rows": 0, "unsafe_keys": 0}
    ok_keys: dict[str, str] = {}
    for r in keys:
        if r["status"] != "ok":
            counts["skipped_error_rows"] += 1
            continue
        try:
            safe_relpath(r["key"])
        except UnsafeKey as e:
            log.error("skipped: %s", e)
            counts["unsafe_keys"] += 1
            continue
        ok_keys[r["key"]] = EXTENSIONS.get(r[format_column] or "png", ".png")
    names: dict[str, str] = {}
    for ext in set(ok_keys.values()):
        names.update(output_names([k for k, e in ok_keys.items() if e == ext], ext))
    root = Path(out).resolve()
    for row in iter_rows(dst, ["key", image_column]):
        rel = names.get(str(row["key"]))
        if rel is None or row[image_column] is None:
            continue
        target = (root / rel).resolve()
        if root not in target.parents:
            counts["unsafe_keys"] += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(row[image_column])  # type: ignore[arg-type]
        counts["written"] += 1
    return counts


def ensure_dir(path: str) -> None:
    os.makedirs(path, exist_ok=True)
