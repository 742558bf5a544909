"""Test helpers shared by several test files (pytest puts this folder on sys.path)."""
import importlib.util
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from storage import open_repository
from tracking.synthetic import write_video


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


# -- running keyreid-watch in tests -----------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(importlib.util.find_spec("ultralytics").submodule_search_locations[0]) / "assets"


def bus_video(path: Path, num_frames: int) -> Path:
    """bus.jpg (4 people) panned back and forth a few pixels per frame, 400x560, 10 fps."""
    bus = cv2.cvtColor(cv2.imread(str(ASSETS / "bus.jpg")), cv2.COLOR_BGR2RGB)
    bus = cv2.resize(bus, (432, 576), interpolation=cv2.INTER_AREA)
    frames = []
    for i in range(num_frames):
        k = i % 16 if (i // 16) % 2 == 0 else 15 - i % 16
        frames.append(np.ascontiguousarray(bus[8 - k // 2: 8 - k // 2 + 560, 2 * k: 2 * k + 400]))
    return write_video(path, frames, fps=10)


def watcher_config(folder: Path, weights: Path, cameras: str, db: str = "watch.db") -> Path:
    path = folder / "cams.yaml"
    path.write_text(textwrap.dedent(f"""
        database: sqlite:///{db}
        detector: {{weights: {weights}, imgsz: 640}}
        keypoints: {{backend: yolo-pose}}
        reid: {{overrides: {{depth: 2}}, batch_size: 8, max_wait: 0.2}}
        clips: {{window: 8, overlap: 4, lost_after: 10}}
        cameras:
    """) + textwrap.indent(textwrap.dedent(cameras), "  "))
    return path


HALVES = """
- {id: left, source: bus.mkv, crop: [0, 0, 200, 560], max_fps: null}
- {id: right, source: bus.mkv, crop: [200, 0, 200, 560], max_fps: null}
"""


def run_watcher(config: Path, *args: str, wait: bool = True, timeout: float = 240,
                env: dict | None = None):
    """Run the CLI; `wait=False` returns the Popen, its output going to `<config>.N.log`
    (a file, not a pipe nobody drains while the test waits)."""
    command = [sys.executable, "-m", "app.watcher.watch", "--cameras", str(config), *args]
    if not wait:
        log = config.with_suffix(f".{len(list(config.parent.glob('*.log')))}.log")
        with open(log, "w") as out:
            process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                       text=True, env=env)
        process.log = log
        return process
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def wait_for(condition, timeout: float, what: str, process=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            pytest.fail(f"watcher exited ({process.returncode}) before {what}:\n"
                        f"{process.log.read_text()[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")




# -- a real PostgreSQL server for the storage and watcher tests -------------------------------
class PostgresServer:
    """A throw-away PostgreSQL cluster: `initdb` into a temporary folder, listening on
    127.0.0.1 only (a free port) with its unix socket in that folder. As root the server
    binaries run as the `postgres` user (initdb refuses root). `database()` makes a fresh,
    empty database per test, so tests never see each other's rows."""

    USER = "keyreid"

    def __init__(self) -> None:
        import itertools
        import os
        import shutil
        import tempfile

        self._bindir = self._find_bindir()
        self._as_postgres = os.getuid() == 0
        self.folder = Path(tempfile.mkdtemp(prefix="keyreid-pg-"))
        if self._as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
        self.data = self.folder / "data"
        self.port = _free_port()
        self._names = itertools.count(1)
        try:
            self._run("initdb", "-D", str(self.data), "-U", self.USER, "--auth=trust",
                      "--no-sync", "-E", "UTF8")
            self.start()
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def start(self) -> None:
        """Start the server (again, after `halt`)."""
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")

    def halt(self) -> None:
        """Stop the server, keeping its data (an outage; `start` ends it)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    @staticmethod
    def _find_bindir() -> Path:
        import shutil

        for candidate in (shutil.which("initdb"), "/usr/lib/postgresql/15/bin/initdb"):
            if candidate and Path(candidate).exists() and (Path(candidate).parent / "pg_ctl").exists():
                return Path(candidate).parent
        raise RuntimeError("initdb not found (install PostgreSQL's server binaries)")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self._bindir / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                cwd=self.folder, check=False)
        if result.returncode:
            raise RuntimeError(f"{tool} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout)[-2000:]}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.USER}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database's URL."""
        name = f"keyreid_{next(self._names)}"
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def sql(self, statement: str, database: str = "postgres") -> None:
        """Run one statement as the server's owner (roles, grants)."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.USER} "
                             f"dbname={database}", autocommit=True) as conn:
            conn.execute(statement)

    def stop(self) -> None:
        """Stop the server for good and remove its folder."""
        import shutil

        try:
            self.halt()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- a real Ray cluster (a head and one more node) for the Ray backend's tests ---------------
OBJECT_STORE_BYTES = 300 * 1024 * 1024  # per node; the tests' crops and frames need a few MB


class RayCluster:
    """`ray start --head` and `ray start --address` on this machine, both given 127.0.0.1, in
    the foreground (`--block`) so that stopping the two processes stops exactly this cluster
    (`ray stop` would stop every Ray on the machine). Ray registers its nodes under the
    machine's own address whatever it is given (`resolve_ip_for_localhost`). The cluster has a
    token of its own (Ray's token authentication); a driver needs `env` to join it."""

    def __init__(self, cpus_per_node: int = 2, timeout: float = 90.0) -> None:
        import os
        import secrets
        import shutil
        import tempfile

        ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
        if ray is None:
            raise RuntimeError("the `ray` command is not installed")
        self.folder = Path(tempfile.mkdtemp(prefix="keyreid-ray-"))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        env = self.env
        # A small object store: Ray's default is 30% of the RAM per node, in /dev/shm, which the
        # rest of the suite shares (DataLoader workers pass tensors through it); the tests' crops
        # and frames need a few MB.
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node), "--block",
                  "--disable-usage-stats", "--object-store-memory", str(OBJECT_STORE_BYTES)]
        self.logs = [open(self.folder / "head.log", "w"), open(self.folder / "node.log", "w")]
        self.processes = [subprocess.Popen(
            [ray, "start", "--head", "--port", str(self.port), "--include-dashboard", "false",
             "--temp-dir", str(self.folder / "tmp"), *common],
            stdout=self.logs[0], stderr=subprocess.STDOUT, env=env, start_new_session=True)]
        try:
            self._wait_for_nodes(1, timeout)
            self.processes.append(subprocess.Popen(
                [ray, "start", "--address", self.address, *common],
                stdout=self.logs[1], stderr=subprocess.STDOUT, env=env, start_new_session=True))
            self._wait_for_nodes(2, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_for_nodes(self, count: int, timeout: float) -> None:
        probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"ray start exited ({process.returncode}): "
                                       f"{self.log_tail()}")
            result = subprocess.run([sys.executable, "-c", probe, self.address],
                                    capture_output=True, text=True, timeout=60, check=False,
                                    env=self.env)
            if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1.0)
        raise RuntimeError(f"the Ray cluster did not reach {count} node(s) in {timeout:.0f} s: "
                           f"{self.log_tail()}")

    def log_tail(self) -> str:
        return " | ".join((self.folder / name).read_text()[-800:] for name in ("head.log", "node.log")
                          if (self.folder / name).exists())

    def stop(self) -> None:
        import os
        import shutil

        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # `ray start --block` can take ~30 s to clean up
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        for log in self.logs:
            log.close()
        shutil.rmtree(self.folder, ignore_errors=True)
