"""DST layout rules.

DST reads as one table: ``pyarrow.dataset``, DuckDB and Ray Data pointed at DST see exactly the
current rows, one per key. So the data files are the only files not starting with ``_``:

    DST/<shard>.parquet          one file per input shard (deterministic name)
    DST/_markers/<shard>.json    done-marker, written after the data file is published
    DST/_tmp/<run id>/           the run's plan and the part files workers write (never read as data)
    DST/_config.json             the settings this dataset was made with
    DST/_lease.json              the live run's lease (heartbeat + expiry)
    DST/_lease.json.lock         (local DST only) lock file for lease compare-and-replace
    DST/_runs/<run id>.json      one record per run
    DST/_manifest.json           written last by every run
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import storage

log = logging.getLogger(__name__)

MARKERS = "_markers"
TMP = "_tmp"
CONFIG = "_config.json"
LEASE = "_lease.json"
RUNS = "_runs"
MANIFEST = "_manifest.json"
DATA_SUFFIX = ".parquet"
DEFAULT_LEASE_TTL_S = 60.0


class DstError(RuntimeError):
    """DST cannot be used as asked (settings differ, another run is live)."""


def data_file(dst: str, shard: str) -> str:
    return storage.join(dst, shard + DATA_SUFFIX)


def marker_file(dst: str, shard: str) -> str:
    return storage.join(dst, MARKERS, shard + ".json")


def read_json(uri: str) -> Any | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
    except OSError as e:
        if "NotFound" in str(e) or "No such file" in str(e) or "does not exist" in str(e):
            return None
        raise


def write_json(uri: str, obj: Any) -> None:
    storage.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


MARKER_READERS = 32  # parallel GETs: a resume reads every marker once


def iter_markers(dst: str) -> Iterator[dict[str, Any]]:
    """Every done-marker of DST, fetched in parallel and yielded one by one (never all held)."""
    fs = storage.resolve(dst)[0]
    uris = (storage.to_uri(fs, i.path) for i in storage.list_files(storage.join(dst, MARKERS), recursive=False)
            if i.base_name.endswith(".json"))
    with ThreadPoolExecutor(MARKER_READERS) as pool:
        batch: list[str] = []
        for uri in uris:
            batch.append(uri)
            if len(batch) >= 4 * MARKER_READERS:
                yield from pool.map(_read_marker, batch)
                batch = []
        yield from pool.map(_read_marker, batch)


def _read_marker(uri: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(uri))  # type: ignore[no-any-return]


def read_markers(dst: str) -> dict[str, dict[str, Any]]:
    """shard -> marker, all in memory: for small DSTs and tools (verify, tests)."""
    return {m["shard"]: m for m in iter_markers(dst)}


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """64-bit hashes of keys: the driver's done-state costs 8 bytes per unit, not a Python string."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little")
                        for k in keys), dtype=np.uint64)


class DoneIndex:
    """Units already in DST: sorted 64-bit key hashes with, per unit, a hash of its source
    version and the shard holding it (20 bytes per unit on the driver, never the key strings).

    A key in two markers (a run that died between publishing a changed unit's new shard and
    dropping it from its old one) keeps its newest entry; the others are ``superseded``.
    """

    def __init__(self, hashes: np.ndarray | None = None, versions: np.ndarray | None = None,
                 shards: np.ndarray | None = None, shard_names: list[str] | None = None,
                 shard_times: list[float] | None = None) -> None:
        self.shard_names = shard_names or []
        h = hashes if hashes is not None else np.zeros(0, np.uint64)
        v = versions if versions is not None else np.zeros(len(h), np.uint64)
        s = shards if shards is not None else np.zeros(len(h), np.int32)
        times = np.asarray(shard_times or [0.0] * len(self.shard_names), np.float64)
        # newest entry first within equal hashes, then keep the first of each hash
        order = np.lexsort((-times[s] if len(s) else s, h))
        h, v, s = h[order], v[order], s[order]
        first = np.ones(len(h), bool)
        first[1:] = h[1:] != h[:-1]
        self.superseded = [(int(si), int(hi)) for si, hi in zip(s[~first], h[~first])]
        self.hashes, self.versions, self.shards = h[first], v[first], s[first]
        self.seen = np.zeros(len(self.hashes), bool)  # set by lookup(): listed this run

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(done mask, positions) of ``keys``; marks them seen."""
        h = key_hashes(keys)
        if not len(self.hashes):
            return np.zeros(len(keys), bool), np.zeros(len(keys), np.int64)
        pos = np.searchsorted(self.hashes, h).clip(0, len(self.hashes) - 1)
        done = self.hashes[pos] == h
        self.seen[pos[done]] = True
        return done, pos

    def contains(self, keys: list[str]) -> np.ndarray:
        return self.lookup(keys)[0]

    def unseen(self) -> np.ndarray:
        """Positions of done units that the listing did not show (sources deleted)."""
        return np.flatnonzero(~self.seen)


def version_hashes(versions: Iterable[str]) -> np.ndarray:
    """Hashes of source versions; 0 for an unknown version (markers of older releases)."""
    vs = list(versions)
    h = key_hashes(vs)
    h[[i for i, v in enumerate(vs) if not v]] = 0
    return h


def data_files(dst: str) -> list[str]:
    """Shard names of the data files at DST's top level."""
    return sorted(
        i.base_name[: -len(DATA_SUFFIX)]
        for i in storage.list_files(dst, recursive=False)
        if i.base_name.endswith(DATA_SUFFIX) and not i.base_name.startswith(("_", "."))
    )


@dataclass
class DstState:
    done: DoneIndex
    shards: int  # committed shards
    totals: dict[str, int]  # rows / ok / error over the committed shards
    small: int = 0  # loose-file shards under half of small_rows*2 rows (compaction candidates)
    removed_orphans: list[str] = field(default_factory=list)


def prepare(dst: str, fingerprint: dict[str, Any], overwrite: bool, small_rows: int = 0) -> DstState:
    """Check DST's settings against ours, clear leftovers of crashed runs, return done units.

    Same settings: resume (done shards are skipped). Different settings: refused unless
    ``overwrite``, which deletes the data files and markers first.
    """
    existing = read_json(storage.join(dst, CONFIG))
    if existing is not None and existing != fingerprint:
        if not overwrite:
            diff = sorted(k for k in set(existing) | set(fingerprint) if existing.get(k) != fingerprint.get(k))
            details = "; ".join(f"{k}: {existing.get(k)!r} -> {fingerprint.get(k)!r}" for k in diff)
            raise DstError(
                f"{dst} was written with different settings ({details}). "
                "Use a new --out, or --overwrite to replace it."
            )
    if overwrite and existing is not None:
        for shard in data_files(dst):
            storage.delete(data_file(dst, shard))
        storage.delete(storage.join(dst, MARKERS))
        log.warning("--overwrite: removed the previous data files and markers of %s", dst)
    storage.delete(storage.join(dst, TMP))
    write_json(storage.join(dst, CONFIG), fingerprint)
    return read_state(dst, clean_orphans=True, small_rows=small_rows)


def read_state(dst: str, clean_orphans: bool = False, small_rows: int = 0) -> DstState:
    """Done-state from the markers (read once, in parallel; only hashes and totals are kept).

    ``clean_orphans``: delete data files without a marker (published by a run that died before
    its marker), so their units are redone.
    """
    names: list[str] = []
    times: list[float] = []
    hashes: list[np.ndarray] = []
    versions: list[np.ndarray] = []
    shards: list[np.ndarray] = []
    totals = {"rows": 0, "ok": 0, "error": 0}
    small = 0
    for m in iter_markers(dst):
        small += int(str(m["shard"]).startswith("files-") and int(m.get("rows", 0)) < small_rows)
        units = m.get("units", [])
        hashes.append(key_hashes(units))
        versions.append(version_hashes(m.get("versions") or [""] * len(units)))
        shards.append(np.full(len(units), len(names), np.int32))
        names.append(m["shard"])
        times.append(float(m.get("finished_at", 0.0)))
        for k in totals:
            totals[k] += int(m.get(k, 0))
    known = set(names)
    orphans = [s for s in data_files(dst) if s not in known] if clean_orphans else []
    for s in orphans:
        storage.delete(data_file(dst, s))
    if orphans:
        log.warning("removed %d data files without done-markers (a crashed run)", len(orphans))
    cat = (lambda xs, t: np.concatenate(xs) if xs else np.zeros(0, t))  # noqa: E731
    done = DoneIndex(cat(hashes, np.uint64), cat(versions, np.uint64), cat(shards, np.int32), names, times)
    return DstState(done=done, shards=len(names), totals=totals, removed_orphans=orphans, small=small)


def lease_ttl_s() -> float:
    """Lease lifetime without a heartbeat: ``AEJOB_LEASE_TTL_S`` (default 60 s)."""
    raw = os.environ.get("AEJOB_LEASE_TTL_S", "").strip()
    try:
        ttl = float(raw) if raw else DEFAULT_LEASE_TTL_S
    except ValueError:
        raise DstError(f"AEJOB_LEASE_TTL_S must be a number of seconds, not {raw!r}") from None
    if ttl <= 0:
        raise DstError(f"AEJOB_LEASE_TTL_S must be positive, not {raw!r}")
    return ttl


class Lease:
    """A run's claim on DST: ``_lease.json`` renewed by a heartbeat thread, with an expiry.

    A second run on the same DST is refused while the lease is live; a crashed run's lease
    lapses after ``ttl_s`` (``AEJOB_LEASE_TTL_S``, default 60 s) and the next run takes over
    without manual cleanup. Every change is a conditional write (``storage.create_only`` for a
    fresh lease, ``storage.replace_if_match`` to take over an expired one or to renew ours), so
    two runs racing for DST cannot both win, and a run whose lease was taken notices at its next
    heartbeat (``lost``) and stops before publishing anything.
    """

    def __init__(self, dst: str, ttl_s: float | None = None, run_id: str | None = None) -> None:
        self.uri = storage.join(dst, LEASE)
        self.ttl_s = float(ttl_s) if ttl_s is not None else lease_ttl_s()
        self.owner = run_id or uuid.uuid4().hex
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: str | None = None
        self.lost = False
        self.took_over: dict[str, Any] | None = None  # the expired lease this run replaced

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": self.host, "pid": os.getpid(),
                           "ttl_s": self.ttl_s, "renewed_at": now,
                           "expires_at": now + self.ttl_s}, indent=2, sort_keys=True).encode()

    @staticmethod
    def _parse(raw: bytes | None) -> dict[str, Any] | None:
        try:
            obj = json.loads(raw) if raw else None
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    def acquire(self) -> None:
        for _ in range(5):
            if storage.create_only(self.uri, self._body()):
                break
            raw, token = storage.read_versioned(self.uri)
            if raw is None:
                continue  # released in between: try to create it again
            cur = self._parse(raw)  # unreadable counts as expired: nobody can renew it
            if cur and cur.get("owner") == self.owner:
                break  # our own create, retried after its reply was lost
            left = float(cur.get("expires_at", 0)) - time.time() if cur else -1.0
            if cur and left > 0:
                raise DstError(
                    f"another run ({str(cur.get('owner', '?'))[:22]} on {cur.get('host', '?')}, "
                    f"pid {cur.get('pid', '?')}) holds the lease on this DST for {left:.0f} s more; "
                    "wait for it to finish, or, if it crashed, for its lease to lapse "
                    f"(AEJOB_LEASE_TTL_S, {float(cur.get('ttl_s', self.ttl_s)):.0f} s without a heartbeat)"
                )
            if token is not None and storage.replace_if_match(self.uri, self._body(), token):
                self.took_over = cur or {}
                log.warning("took over the expired lease of run %s (lapsed %.0f s ago)",
                            str((cur or {}).get("owner", "?"))[:22], -left)
                break
        else:
            raise DstError("could not acquire the DST lease: other runs kept changing it")
        raw, token = storage.read_versioned(self.uri)  # for stores that ignore conditions
        cur = self._parse(raw)
        if not cur or cur.get("owner") != self.owner:
            raise DstError("lost the race for the DST lease to another run")
        self._token = token
        self._thread = threading.Thread(target=self._heartbeat, name="aejob-lease", daemon=True)
        self._thread.start()

    def renew(self) -> bool:
        """Extend our lease; False (and ``lost``) when another run holds it now."""
        raw, token = storage.read_versioned(self.uri)
        cur = self._parse(raw)
        if not cur or cur.get("owner") != self.owner or token is None:
            self.lost = True
            log.error("the DST lease was taken by another run (or removed)")
            return False
        if storage.replace_if_match(self.uri, self._body(), token):
            return True
        raw, _ = storage.read_versioned(self.uri)  # changed between the read and the write
        cur = self._parse(raw)
        if not cur or cur.get("owner") != self.owner:
            self.lost = True
            log.error("the DST lease was taken by another run")
            return False
        return True  # our own earlier write (a retried request): renewed

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    return
            except Exception as e:  # a transient storage error: retry at the next beat
                log.warning("lease heartbeat failed: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            raw, token = storage.read_versioned(self.uri)
            cur = self._parse(raw)
            if cur and cur.get("owner") == self.owner and token is not None:
                storage.delete_if_match(self.uri, token)
        except Exception as e:
            log.warning("could not release the lease: %s", e)
