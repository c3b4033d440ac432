"""Run the ``aejob`` CLI and record what the driver process itself did: its ``/proc/self/io``
write bytes (``wchar``: every write() it made — files, stdout/stderr, forwarded worker logs) and
its peak RSS, and the peak of that RSS without shared memory (sampled every 0.2 s: the pages of
the node's object store the driver has touched are ``/dev/shm`` pages, counted in RSS but owned
by the node, not the driver). Used by ``aejob bench scale`` and the multi-node tests:

    python -m jobs.driver_io OUT.json clean SRC --out DST ...
"""

from __future__ import annotations

import atexit
import json
import resource
import sys
import threading
import time


def _proc_numbers(path: str) -> dict[str, int]:
    """The numeric ``name: value [kB]`` lines of a /proc file, in bytes where given in kB."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(":")
                first = v.split()[:1]
                if first and first[0].isdigit():
                    out[k.strip()] = int(first[0]) * (1024 if v.rstrip().endswith("kB") else 1)
    except OSError:  # not Linux
        pass
    return out


def read_io() -> dict[str, int]:
    return _proc_numbers("/proc/self/io")


def rss_parts() -> dict[str, int]:
    """``RssAnon``, ``RssFile`` and ``RssShmem`` of /proc/self/status, in bytes."""
    status = _proc_numbers("/proc/self/status")
    return {k: status[k] for k in ("RssAnon", "RssFile", "RssShmem") if k in status}


class PeakSampler:
    """Peak of RssAnon + RssFile (RSS without shared memory) and of RssShmem, sampled."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.private = self.shmem = 0
        self._every = every_s
        self.sample()
        threading.Thread(target=self._run, name="aejob-rss", daemon=True).start()

    def sample(self) -> None:
        p = rss_parts()
        self.private = max(self.private, p.get("RssAnon", 0) + p.get("RssFile", 0))
        self.shmem = max(self.shmem, p.get("RssShmem", 0))

    def _run(self) -> None:
        while True:
            time.sleep(self._every)
            self.sample()


def main() -> None:
    out_path, args = sys.argv[1], sys.argv[2:]
    t0 = time.time()
    peaks = PeakSampler()

    def dump() -> None:
        peaks.sample()
        io = read_io()
        rec = {"wchar": io.get("wchar", -1), "write_bytes": io.get("write_bytes", -1),
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "peak_rss_private_bytes": peaks.private, "peak_rss_shmem_bytes": peaks.shmem,
               "seconds": round(time.time() - t0, 3), "args": args}
        # written with os-level calls after the reading, so the record does not count itself
        with open(out_path, "w") as f:
            json.dump(rec, f)

    atexit.register(dump)
    sys.argv = ["aejob", *args]
    from jobs.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
