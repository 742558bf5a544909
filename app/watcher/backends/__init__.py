"""Where a watcher's stages run, and how their results travel: the *backend*.

The stages are the same everywhere: a camera stage (decode -> detect -> track -> clip,
`app.watcher.worker.run_camera`), the encoder (`app.watcher.encoder_service`), and the store and
link stages in the watcher's main process (one writer per database, one linker per site). A
backend places the camera stage and the encoder's model and carries messages between them:

- `local` (the default): a spawned process per camera on this machine, its results on a
  bounded `multiprocessing.Queue`; the encoder in the main process.
- `ray`: an actor per camera on a Ray cluster (`--ray-address`, or a Ray instance on this
  machine), its results taken by the main process in batches, the clips' crops left in Ray's
  object store until the encoder actor (on a GPU where the cluster has one) reads them.

Each camera is a `CameraHandle`; the watcher supervises handles the same way whatever runs them.
"""
from __future__ import annotations

import queue
from typing import Protocol

from ..config import CameraConfig, ReidConfig
from ..worker import WorkerSettings

BACKENDS = ("local", "ray")


class BackendError(RuntimeError):
    """The backend cannot start (Ray missing, no cluster at the address): nothing has run."""


def take_waiting(messages: queue.Queue, limit: int) -> list:
    """Up to `limit` messages already in `messages`, without waiting."""
    taken = []
    for _ in range(limit):
        try:
            taken.append(messages.get_nowait())
        except queue.Empty:
            break
    return taken


class CameraHandle(Protocol):
    """One running camera stage, as the watcher's main loop sees it."""

    def take(self, limit: int) -> list:
        """Up to `limit` messages that have arrived (never blocks)."""

    def reader_alive(self) -> bool:
        """Messages may still arrive (False once the camera's channel has closed)."""

    def is_alive(self) -> bool:
        """The camera stage is still running (a process, an actor)."""

    def exit_reason(self) -> str:
        """Why a stage that is no longer alive ended, for one that died without saying so."""

    def kill(self) -> None:
        """End the stage now (it loses what it had not sent)."""

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the stage to end."""


class Backend(Protocol):
    name: str

    def start_camera(self, camera: CameraConfig, settings: WorkerSettings) -> CameraHandle:
        """Start a camera stage (again, for a restart)."""

    def stop_cameras(self) -> None:
        """Ask every camera stage to finish: they send their last clips and `Finished`."""

    def encoder(self, config: ReidConfig):
        """The encoder model, placed: an object with `info` and `encode_clips`."""

    def close(self) -> None:
        """Release what the backend holds (after every camera has ended)."""


def make_backend(name: str, queue_size: int, *, ray_address: str | None = None,
                 cameras: int = 1, threads: int = 1) -> Backend:
    """The named backend. `ray`: `ray_address` of a cluster (None: a Ray instance of its own on
    this machine, with room for `cameras` camera stages of `threads` threads each)."""
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(queue_size)
    if name == "ray":
        from .ray_cluster import RayBackend

        return RayBackend(queue_size, ray_address, cameras, threads)
    raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
