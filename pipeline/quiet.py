"""Keep Ray's own noise out of the default output (``aejob -v`` shows everything).

Python-side Ray logging is quieted by levels (``runner.init_ray``). One line cannot be: Ray
Data's actor pools always hand their (driver-held) transformer to new actors through the object
store, so every pool start makes the driver's C++ core worker print an ``E`` line saying restarts
could fail if those objects were lost (ray#57733). Restarts stay on and are safe here (the driver
keeps the objects alive for the whole run); the line is filtered out of this process's stderr.
"""

from __future__ import annotations

import atexit
import os
import re
import threading

NOISE = (re.compile(rb"has constructor arguments in the object store and max_restarts > 0"),)


class StderrFilter:
    """Routes fd 2 through a pipe and drops lines matching ``NOISE``; the rest pass unchanged."""

    def __init__(self) -> None:
        self._orig = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self._r = r
        self._thread = threading.Thread(target=self._pump, name="aejob-stderr", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _pump(self) -> None:
        buf = b""
        with os.fdopen(self._r, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                out = b"".join(ln + b"\n" for ln in lines if not any(p.search(ln) for p in NOISE))
                if out:
                    os.write(self._orig, out)
        if buf:
            os.write(self._orig, buf)

    def close(self) -> None:
        """Put the real stderr back and let the pump write what is still in the pipe."""
        if self._orig < 0:
            return
        os.dup2(self._orig, 2)  # the pipe's last writer is gone: the pump reads EOF
        self._thread.join(timeout=5)
        os.close(self._orig)
        self._orig = -1


_installed: StderrFilter | None = None


def filter_ray_stderr() -> None:
    global _installed
    if _installed is None:
        _installed = StderrFilter()
