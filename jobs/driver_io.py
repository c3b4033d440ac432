"""Run the ``aejob`` CLI and record what the driver process itself did: its ``/proc/self/io``
write bytes (``wchar``: every write() it made — files, stdout/stderr, forwarded worker logs) and
its peak RSS. Used by ``aejob bench scale`` and the multi-node tests:

    python -m jobs.driver_io OUT.json clean SRC --out DST ...
"""

from __future__ import annotations

import atexit
import json
import resource
import sys
import time


def read_io() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k.strip()] = int(v)
    except OSError:  # not Linux
        pass
    return out


def main() -> None:
    out_path, args = sys.argv[1], sys.argv[2:]
    t0 = time.time()

    def dump() -> None:
        io = read_io()
        rec = {"wchar": io.get("wchar", -1), "write_bytes": io.get("write_bytes", -1),
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
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
