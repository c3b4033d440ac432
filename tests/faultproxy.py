"""A small fault-injecting HTTP proxy for S3 tests: 503 SlowDown and connection resets.

    with FaultProxy("http://127.0.0.1:PORT", slowdown=0.10, reset=0.01, seed=0) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        ...
    proxy.stats  # {"requests": ..., "forwarded": ..., "slowdown": ..., "reset": ...}

Clients talk to ``proxy.url`` as if it were the S3 endpoint (path-style requests; the ``Host``
header is passed through unchanged so SigV4 signatures stay valid). Each request draws from a
seeded RNG: with probability ``slowdown`` it is answered ``503`` with an S3 XML error body
(``<Code>SlowDown</Code>``) without reaching the upstream; with probability ``reset`` the client
connection is reset (RST, ``SO_LINGER`` 0), half of those before and half after the upstream has
handled the request (the reply is lost, so the client's retry repeats a request S3 already
applied). Everything else is forwarded as is (``Content-Length`` or chunked bodies, including
``Expect: 100-continue``).

Bounded: at most ``max_connections`` handler threads (further clients wait in the listen
backlog; idle keep-alive connections are closed after 10 s), and the proxy shuts itself down
after ``lifetime_s`` seconds if nobody stops it. Nothing is logged: requests carry signed ``Authorization`` headers.
"""

from __future__ import annotations

import http.client
import random
import socket
import socketserver
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlparse

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY</RequestId><HostId>faultproxy</HostId></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade", "expect"}


class _Reset(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections are closed (clients reconnect)
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - never log requests
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline(3)
            return b"".join(parts)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reset_connection(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        raise _Reset

    def _handle(self) -> None:
        body = self._read_body()
        fault = self.server.draw()
        if fault == "slowdown":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
            self.send_header("x-amz-request-id", "FAULTPROXY")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOWDOWN_BODY)
            return
        if fault == "reset-before":
            self._reset_connection()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port,
                                          timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
        finally:
            conn.close()
        self.server.count("forwarded")
        if fault == "reset-after":
            self._reset_connection()
        self.send_response(status, reason)
        head = self.command == "HEAD"  # keeps the object's Content-Length, has no body
        for k, v in resp_headers:
            low = k.lower()
            if low in HOP_BY_HOP or low in ("date", "server") or (low == "content-length" and not head):
                continue
            self.send_header(k, v)
        if not head:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            self.server.count("requests")
            self._handle()
            self.wfile.flush()
        except _Reset:
            self.close_connection = True
        except (OSError, http.client.HTTPException, ValueError):
            self.close_connection = True


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, upstream: str, slowdown: float, reset: float, seed: int,
                 max_connections: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        u = urlparse(upstream)
        self.upstream_host, self.upstream_port = u.hostname or "127.0.0.1", u.port or 80
        self.slowdown, self.reset = slowdown, reset
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(max_connections)
        self.stats = {"requests": 0, "forwarded": 0, "slowdown": 0, "reset": 0}
        self.enabled = True
        self.closing = False

    def process_request(self, request: Any, client_address: Any) -> None:
        # at most max_connections handler threads; further clients wait in the listen backlog
        while not self.slots.acquire(timeout=0.2):
            if self.closing:
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def count(self, what: str) -> None:
        with self.lock:
            self.stats[what] += 1

    def draw(self) -> str | None:
        with self.lock:
            x = self.rng.random()
            if not self.enabled:
                return None
            if x < self.slowdown:
                self.stats["slowdown"] += 1
                return "slowdown"
            if x < self.slowdown + self.reset:
                self.stats["reset"] += 1
                return "reset-before" if self.rng.random() < 0.5 else "reset-after"
            return None


class FaultProxy:
    def __init__(self, upstream: str, slowdown: float = 0.10, reset: float = 0.01, seed: int = 0,
                 max_connections: int = 64, lifetime_s: float = 600.0) -> None:
        self._server = _Server(upstream, slowdown, reset, seed, max_connections)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.lifetime_s = lifetime_s
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="faultproxy", daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def stats(self) -> dict[str, int]:
        with self._server.lock:
            return dict(self._server.stats)

    def set_faults(self, enabled: bool) -> None:
        with self._server.lock:
            self._server.enabled = enabled

    def start(self) -> FaultProxy:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._timer.cancel()
        self._server.closing = True
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_port(url: str, timeout_s: float = 5.0) -> None:
    u = urlparse(url)
    end = time.time() + timeout_s
    while True:
        try:
            socket.create_connection((u.hostname, u.port), timeout=1).close()
            return
        except OSError:
            if time.time() > end:
                raise
            time.sleep(0.05)
