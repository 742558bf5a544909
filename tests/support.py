"""Test helpers shared by several test files (pytest puts this folder on sys.path)."""
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from storage import open_repository


class FlakyVideoServer:
    """Serves one video over HTTP; the first request is cut half-way: the connection drops,
    stalls, or (failure "none") the response just ends short."""

    def __init__(self, data: bytes, failure: str) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if outer.requests > 1:
                    self.wfile.write(data)
                    return
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if failure == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif failure == "stall":
                    time.sleep(3)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/video.ts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def stored_clip_count(db: Path) -> int:
    """Clips committed to a watcher's SQLite file so far (0 before its schema exists)."""
    if not db.exists():
        return 0
    try:
        with open_repository(f"sqlite:///{db}", readonly=True) as repo:
            return repo.stats().clips
    except Exception:  # noqa: BLE001 - the schema may not exist yet while the watcher starts
        return 0
