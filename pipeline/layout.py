"""DST layout rules.

DST reads as one table: ``pyarrow.dataset``, DuckDB and Ray Data pointed at DST see exactly the
current rows, one per key. So the data files are the only files not starting with ``_``:

    DST/<shard>.parquet          one file per input shard (deterministic name)
    DST/_markers/<shard>.json    done-marker, written after the data file is published
    DST/_tmp/                    shard files being written (never read as data)
    DST/_config.json             the settings this dataset was made with
    DST/_lease.json              the live run's lease (heartbeat + expiry)
    DST/_lease.json.lock         (local DST only) lock file for lease compare-and-replace
    DST/_runs/<run id>.json      one record per run
    DST/_manifest.json           written last by every run
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

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


def read_markers(dst: str) -> dict[str, dict[str, Any]]:
    out = {}
    for info in storage.list_files(storage.join(dst, MARKERS), recursive=False):
        if info.base_name.endswith(".json"):
            m = json.loads(storage.read_bytes(storage.to_uri(storage.resolve(dst)[0], info.path)))
            out[m["shard"]] = m
    return out


def data_files(dst: str) -> list[str]:
    """Shard names of the data files at DST's top level."""
    return sorted(
        i.base_name[: -len(DATA_SUFFIX)]
        for i in storage.list_files(dst, recursive=False)
        if i.base_name.endswith(DATA_SUFFIX) and not i.base_name.startswith(("_", "."))
    )


@dataclass
class DstState:
    markers: dict[str, dict[str, Any]]
    done_units: set[str]
    removed_orphans: list[str] = field(default_factory=list)


def prepare(dst: str, fingerprint: dict[str, Any], overwrite: bool) -> DstState:
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
    markers = read_markers(dst)
    orphans = [s for s in data_files(dst) if s not in markers]
    for s in orphans:  # published by a run that died before its marker: redo those units
        storage.delete(data_file(dst, s))
    if orphans:
        log.warning("removed %d data files without done-markers (a crashed run)", len(orphans))
    done = {u for m in markers.values() for u in m.get("units", [])}
    return DstState(markers=markers, done_units=done, removed_orphans=orphans)


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
