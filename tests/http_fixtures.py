"""A tiny HTTP server on 127.0.0.1 for download tests: Range support and scripted failures."""

from __future__ import annotations

import http.server
import threading
from dataclasses import dataclass, field


@dataclass
class ServerScript:
    """What the server serves and how it misbehaves; ``requests`` records each request's Range."""

    body: bytes = b""
    drop_after: int | None = None  # first request: send this many body bytes, then hang up
    fail_503: int = 0  # answer the first N requests with 503
    ignore_range: bool = False  # always answer 200 with the whole body
    status: int = 200  # anything else: answer every request with this error status
    no_length: bool = False  # no Content-Length: the body ends when the server closes (HTTP/1.0 style)
    stall_seconds: float = 0  # accept, then say nothing this long (or until the server stops)
    requests: list[str | None] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    script: ServerScript  # set per server by serve()

    def do_GET(self):  # noqa: N802 (http.server's naming)
        s = self.script
        rng = self.headers.get("Range")
        s.requests.append(rng)
        if s.stall_seconds and self.server.stopping.wait(s.stall_seconds):
            return  # stopped while stalling: hang up without a word
        if len(s.requests) <= s.fail_503:
            self.send_error(503, "try again")
            return
        if s.status != 200:
            self.send_error(s.status)
            return
        start = 0
        if rng and not s.ignore_range:
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
            if start >= len(s.body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(s.body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(s.body) - 1}/{len(s.body)}")
        else:
            self.send_response(200)
        data = s.body[start:]
        if not s.no_length:
            self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if s.drop_after is not None and len(s.requests) == s.fail_503 + 1:
            data = data[: s.drop_after]  # a short body: Content-Length promised more, or none was sent
        self.wfile.write(data)

    def log_message(self, *args):  # keep pytest output clean
        pass


class serve:
    """``with serve(script) as base_url: ...`` runs the server in a thread for the block."""

    def __init__(self, script: ServerScript):
        handler = type("Handler", (_Handler,), {"script": script})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.stopping = threading.Event()  # ends stalls, so closing need not wait for them
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
