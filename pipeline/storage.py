"""Filesystems for SRC/DST: local paths and ``s3://`` through ``pyarrow.fs``.

S3 is configured from the standard AWS environment: ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for S3-compatible stores, ``AWS_REGION``/``AWS_DEFAULT_REGION`` and the
default credential chain. A bare ``pyarrow.fs.S3FileSystem()`` ignores ``AWS_ENDPOINT_URL``, so
we pass it explicitly. Requests retry with AWS's standard strategy (``AEJOB_S3_MAX_ATTEMPTS``,
default 10). Credentials are never logged (botocore's request logging stays at INFO even when the
CLI runs with ``-v``: its DEBUG lines carry signed ``Authorization`` headers).

Writes to S3 can ask for server-side encryption and a storage class:

- ``AEJOB_S3_SSE`` = ``AES256`` | ``aws:kms`` | ``aws:kms:dsse`` (with ``AEJOB_S3_SSE_KMS_KEY_ID``
  for a customer key): applied to every object aejob writes (data files, markers, config,
  lease, run records, manifest);
- ``AEJOB_S3_STORAGE_CLASS`` (e.g. ``STANDARD_IA``, ``INTELLIGENT_TIERING``): applied to the
  published data files only; the small control files stay in STANDARD so resumes can read them.

pyarrow's S3 output streams cannot send these headers, so when either is set the control files
are written with boto3 and a data file is published with a server-side copy that sets them
(its ``_tmp/`` part, deleted after publishing, gets the bucket's default encryption).

Leases use conditional requests (boto3): create-only ``If-None-Match: *`` and ``If-Match: <ETag>``
replace/delete on S3; locally a hard link of a complete temp file (create-only) and an ``flock``
around compare-and-replace.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import re
import threading
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_RETRIES = int(os.environ.get("AEJOB_S3_MAX_ATTEMPTS", "10"))
SSE_VALUES = ("AES256", "aws:kms", "aws:kms:dsse")
STORAGE_CLASSES = ("STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA",
                   "INTELLIGENT_TIERING", "GLACIER", "DEEP_ARCHIVE", "GLACIER_IR", "OUTPOSTS",
                   "SNOW", "EXPRESS_ONEZONE")
ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
_SDK_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")
# Names whose values are credentials: never logged, never put where Ray logs them.
SECRET_NAME_RE = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|PRIVATE|SESSION|AUTH|(^|_)KEY($|_)|APIKEY",
    re.IGNORECASE,
)
NOT_SECRET = ("AEJOB_S3_SSE_KMS_KEY_ID",)  # a key's id, not key material


def is_secret_name(name: str) -> bool:
    """True for variable names that hold credentials (AWS_SECRET_ACCESS_KEY, *_TOKEN, ...)."""
    return name not in NOT_SECRET and bool(SECRET_NAME_RE.search(name))


JOB_ENV_PREFIXES = ("AWS_", "AEJOB_")


def job_env() -> dict[str, str]:
    """The storage settings of this process that workers must share: endpoint, region, aejob's
    S3 write options. Handed to worker stages as an argument (never through Ray's runtime env,
    which Ray writes into its logs); never credentials, which workers take from their own
    environment (instance role, pod env, the shell that started the nodes)."""
    return {k: v for k, v in os.environ.items() if k.startswith(JOB_ENV_PREFIXES) and not is_secret_name(k)}


def apply_env(env: dict[str, str] | None) -> None:
    """On a worker: adopt the driver's storage settings (see :func:`job_env`)."""
    for k, v in (env or {}).items():
        if os.environ.get(k) != v:
            os.environ[k] = v
_lock = threading.Lock()


class ArchivedObjectError(OSError):
    """The object is in an archive storage class and must be restored before it can be read."""


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


def _endpoint_region() -> tuple[str, str]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "")
    return endpoint, region


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint, region = _endpoint_region()
    with _lock:
        return _s3(endpoint, region)


def _quiet_sdk_loggers() -> None:
    """Keep botocore/urllib3 request logging (signed headers) out of DEBUG logs."""
    for name in _SDK_LOGGERS:
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET or lg.level < logging.INFO:
            lg.setLevel(logging.INFO)


@lru_cache(maxsize=8)
def _boto3_client(endpoint: str, region: str) -> Any:
    import boto3
    from botocore.config import Config

    _quiet_sdk_loggers()
    cfg = Config(retries={"mode": "standard", "max_attempts": S3_RETRIES}, connect_timeout=10,
                 read_timeout=60, request_checksum_calculation="when_required",
                 response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None,
                                          region_name=region or None, config=cfg)


def s3_client() -> Any:
    """A boto3 S3 client configured like :func:`s3_filesystem` (endpoint, region, retries)."""
    endpoint, region = _endpoint_region()
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    with _lock:
        return _boto3_client(endpoint, region)


def write_options(data_file: bool = False) -> dict[str, str]:
    """boto3 arguments for S3 writes from ``AEJOB_S3_SSE`` / ``AEJOB_S3_SSE_KMS_KEY_ID`` /
    ``AEJOB_S3_STORAGE_CLASS`` (the storage class only for data files)."""
    out: dict[str, str] = {}
    sse = os.environ.get("AEJOB_S3_SSE", "").strip()
    if sse:
        if sse not in SSE_VALUES:
            raise ValueError(f"AEJOB_S3_SSE must be one of {', '.join(SSE_VALUES)}, not {sse!r}")
        out["ServerSideEncryption"] = sse
        kms_key = os.environ.get("AEJOB_S3_SSE_KMS_KEY_ID", "").strip()
        if kms_key:
            if not sse.startswith("aws:kms"):
                raise ValueError("AEJOB_S3_SSE_KMS_KEY_ID needs AEJOB_S3_SSE=aws:kms or aws:kms:dsse")
            out["SSEKMSKeyId"] = kms_key
    sc = os.environ.get("AEJOB_S3_STORAGE_CLASS", "").strip().upper()
    if sc:
        if sc not in STORAGE_CLASSES:
            raise ValueError(f"AEJOB_S3_STORAGE_CLASS {sc!r} is not an S3 storage class "
                             f"({', '.join(STORAGE_CLASSES)})")
        if data_file:
            out["StorageClass"] = sc
    return out


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _error_code(e: Exception) -> str:
    resp = getattr(e, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", "")) or str(
        resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


_CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
_MISSING = ("NoSuchKey", "404", "NotFound")


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


def archived_storage_class(uri: str) -> str | None:
    """The archive tier of an S3 object that cannot be read without a restore, else None."""
    if not is_s3(uri):
        return None
    bucket, key = split_s3(uri)
    try:
        head = s3_client().head_object(Bucket=bucket, Key=key)
    except Exception:
        return None
    restore = str(head.get("Restore") or "")
    if 'ongoing-request="false"' in restore:  # restored copy available
        return None
    tier = str(head.get("StorageClass") or "")
    archive_status = str(head.get("ArchiveStatus") or "")
    if tier in ARCHIVE_CLASSES or archive_status:
        what = f"{tier} {archive_status}".strip() if archive_status else tier
        return what + (", restore in progress" if 'ongoing-request="true"' in restore else "")
    return None


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return bytes(f.read())
    except OSError as e:
        tier = archived_storage_class(uri) if is_s3(uri) else None
        if tier:
            raise ArchivedObjectError(
                f"object is in an archive storage class ({tier}): restore it first") from e
        raise


def _local_tmp(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"


def _write_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _local_tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local writes go through a temp file + rename (atomic)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        _write_local(path, data)
        return
    opts = write_options()
    if opts:  # SSE headers: pyarrow's output streams cannot send them
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data, **opts)
        return
    with fs.open_output_stream(path) as f:  # one PUT: the object appears whole or not at all
        f.write(data)


def publish(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Move a finished file to its final name (local: atomic rename; S3: server-side copy, then
    the source is deleted). On S3 the copy applies the configured encryption/storage class."""
    opts = write_options(data_file=True) if isinstance(fs, pafs.S3FileSystem) else {}
    if not opts:
        fs.move(src, dst)
        return
    sb, sk = split_s3("s3://" + src)
    db, dk = split_s3("s3://" + dst)
    # managed copy: CopyObject, or a multipart copy above 5 GB
    s3_client().copy({"Bucket": sb, "Key": sk}, db, dk, ExtraArgs=opts)
    fs.delete_file(src)


# ---- conditional writes (leases) --------------------------------------------------------


@contextlib.contextmanager
def _flock(path: str) -> Iterator[None]:
    import fcntl

    fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _token(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def create_only(uri: str, data: bytes) -> bool:
    """Write ``uri`` only if nothing is there; False if something is.

    S3: ``PUT`` with ``If-None-Match: *``. Local: a complete temp file hard-linked to the name
    (``link`` fails if the name exists, and readers never see a half-written file); where hard
    links are not supported, ``open(O_CREAT | O_EXCL)``.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*",
                                   **write_options())
            return True
        except Exception as e:
            if _error_code(e) in _CONFLICT:
                return False
            raise
    path = resolve(uri)[1]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _local_tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    finally:
        os.unlink(tmp)


def read_versioned(uri: str) -> tuple[bytes | None, str | None]:
    """(content, version token) or (None, None) when absent. S3: the ETag; local: a hash."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            r = s3_client().get_object(Bucket=bucket, Key=key)
        except Exception as e:
            if _error_code(e) in _MISSING:
                return None, None
            raise
        return r["Body"].read(), str(r["ETag"])
    path = resolve(uri)[1]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, None
    return data, _token(data)


def _if_match(uri: str, token: str, s3_op: Callable[[str, str], object],
              local_op: Callable[[str], object]) -> bool:
    """Run a conditional change of ``uri``: on S3 ``s3_op(bucket, key)`` (which sends
    ``IfMatch``), locally ``local_op(path)`` under the file lock after checking the version
    ourselves. False when ``uri`` no longer has version ``token`` or is gone."""
    if is_s3(uri):
        try:
            s3_op(*split_s3(uri))
            return True
        except Exception as e:
            if _error_code(e) in _CONFLICT + _MISSING:
                return False
            raise
    path = resolve(uri)[1]
    with _flock(path):
        cur, cur_token = read_versioned(uri)
        if cur is None or cur_token != token:
            return False
        local_op(path)
        return True


def replace_if_match(uri: str, data: bytes, token: str) -> bool:
    """Overwrite ``uri`` only if it still has version ``token``; False if it changed or is gone."""
    return _if_match(
        uri, token,
        lambda bucket, key: s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=token,
                                                   **write_options()),
        lambda path: _write_local(path, data),
    )


def delete_if_match(uri: str, token: str) -> bool:
    """Delete ``uri`` only if it still has version ``token``."""
    def s3_delete(bucket: str, key: str) -> None:
        try:
            s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=token)
        except Exception as e:
            if _error_code(e) not in ("NotImplemented", "501"):
                raise
            s3_client().delete_object(Bucket=bucket, Key=key)  # a store without conditional deletes

    return _if_match(uri, token, s3_delete, os.unlink)


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
