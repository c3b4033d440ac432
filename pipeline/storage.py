"""Filesystems for SRC/DST: local paths and ``s3://`` through ``pyarrow.fs``.

S3 is configured from the standard AWS environment: ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for S3-compatible stores, ``AWS_REGION``/``AWS_DEFAULT_REGION`` and the
default credential chain. A bare ``pyarrow.fs.S3FileSystem()`` ignores ``AWS_ENDPOINT_URL``, so
we pass it explicitly. Requests retry with AWS's standard strategy. Credentials are never logged.
"""

from __future__ import annotations

import os
import posixpath
import threading
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_RETRIES = int(os.environ.get("AEJOB_S3_MAX_ATTEMPTS", "10"))
_lock = threading.Lock()


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@lru_cache(maxsize=8)
def _s3(endpoint: str, region: str) -> pafs.S3FileSystem:
    kwargs: dict[str, object] = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRIES),
        "connect_timeout": 10,
        "request_timeout": 60,
    }
    if region:
        kwargs["region"] = region
    if endpoint:
        u = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = u.netloc
        kwargs["scheme"] = u.scheme or "https"
    return pafs.S3FileSystem(**kwargs)  # type: ignore[arg-type]


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "")
    with _lock:
        return _s3(endpoint, region)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an ``s3://bucket/key`` URI."""
    if is_s3(uri):
        rest = uri[len("s3://"):].rstrip("/")
        return s3_filesystem(), rest
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)).rstrip("/") or "/"


def join(base: str, *parts: str) -> str:
    """Join URI/path parts with '/' (keys always use forward slashes)."""
    if is_s3(base):
        return "s3://" + posixpath.join(base[len("s3://"):].rstrip("/"), *parts)
    return os.path.join(base, *parts)


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return bytes(f.read())


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local writes go through a temp file + rename (atomic)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:  # one PUT: the object appears whole or not at all
        f.write(data)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir(path)


def list_files(uri: str, recursive: bool = True) -> list[pafs.FileInfo]:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    sel = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    return [i for i in fs.get_file_info(sel) if i.type == pafs.FileType.File]
