"""A loopback HTTP server for a directory, with single byte-range GETs (what object stores answer), for the
remote-source tests and the loader benchmark. Binds 127.0.0.1 only; ``drop_every`` > 0 closes every n-th
connection without an answer (a flaky network)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    drop_every = 0
    _count = 0
    _lock = threading.Lock()

    def log_message(self, *args, **kwargs):
        pass

    def do_GET(self):
        with self._lock:
            type(self)._count += 1
            drop = self.drop_every and type(self)._count % self.drop_every == 0
        if drop:
            self.close_connection = True
            self.connection.shutdown(2)  # no status line: the client sees the connection die
            return
        spec = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not spec or not spec.startswith("bytes=") or not os.path.isfile(path):
            return super().do_GET()
        start, _, end = spec[len("bytes="):].partition("-")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start, end = int(start), min(int(end) if end else size - 1, size - 1)
            f.seek(start)
            body = f.read(end + 1 - start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def serve_directory(root: str | Path, drop_every: int = 0) -> Iterator[str]:
    """Serves ``root`` on 127.0.0.1 for the duration of the block; yields its base URL."""
    handler_cls = type("Handler", (_RangeHandler,), {"drop_every": drop_every, "_count": 0})
    handler = functools.partial(handler_cls, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
