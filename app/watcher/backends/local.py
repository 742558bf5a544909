"""The local backend: one spawned process per camera, results on a bounded queue, the encoder
in the main process."""
from __future__ import annotations

import multiprocessing
import queue
import threading

from ..config import CameraConfig, ReidConfig
from ..encoder_service import LocalEncoder
from ..worker import Finished, WorkerSettings, camera_main
from . import take_waiting


class _Inbox:
    """The main process's side of one worker's queue: a reader thread moves messages into a
    local queue. A worker that dies mid-message leaves only this thread blocked (it is a daemon
    and holds nothing); the main loop keeps going and notices the death by the process."""

    def __init__(self, source: multiprocessing.Queue, name: str) -> None:
        self.messages: queue.Queue = queue.Queue(maxsize=8)  # small: back-pressure reaches the worker
        self._source = source
        self.thread = threading.Thread(target=self._read, name=f"inbox-{name}", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                message = self._source.get()
            except (EOFError, OSError, ValueError):
                return
            self.messages.put(message)
            if isinstance(message, Finished):
                return

    def take(self, limit: int) -> list:
        return take_waiting(self.messages, limit)


class ProcessCamera:
    """A camera stage in a worker process of this machine."""

    def __init__(self, process: multiprocessing.Process, inbox: _Inbox) -> None:
        self.process = process
        self.inbox = inbox

    def take(self, limit: int) -> list:
        return self.inbox.take(limit)

    def reader_alive(self) -> bool:
        return self.inbox.thread.is_alive()

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def exit_reason(self) -> str:
        code = self.process.exitcode
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exited with code {code}")
        return f"worker process {how}"

    def kill(self) -> None:
        self.process.kill()  # workers ignore SIGTERM: the main process owns shutdown

    def join(self, timeout: float) -> None:
        self.process.join(timeout=timeout)


class LocalBackend:
    name = "local"

    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self.context = multiprocessing.get_context("spawn")
        self.stop_event = self.context.Event()  # shared by every worker

    def start_camera(self, camera: CameraConfig, settings: WorkerSettings) -> ProcessCamera:
        out = self.context.Queue(self.queue_size)
        process = self.context.Process(target=camera_main, name=f"keyreid-camera-{camera.id}",
                                       args=(camera, settings, out, self.stop_event), daemon=True)
        process.start()
        return ProcessCamera(process, _Inbox(out, camera.id))

    def stop_cameras(self) -> None:
        self.stop_event.set()

    def encoder(self, config: ReidConfig) -> LocalEncoder:
        return LocalEncoder(config)

    def close(self) -> None:
        pass
