"""The Ray backend: a camera stage per actor, the encoder's model in an actor of its own.

Placement: each camera actor asks for the detector's thread share of CPUs (`detector.threads`,
one by default) wherever the cluster has them; the encoder actor asks for (half of) a GPU where
the cluster has one (and the encoder is not pinned to the CPU), else for its own threads' CPUs.
With `detector.service` shared (auto: when the cluster has a GPU) the cameras run no detector
of their own: one detector actor (the other half of a GPU) batches all their frames, and each
camera keeps its tracker.
The watcher's main process (Ray's *driver*) stays the one writer of its database and the
site's linker.

Transport: the driver takes each camera's messages in batches (`CameraActor.take`, one call
at a time per camera, which is the back-pressure: a camera that is not read fills its bounded
outbox and waits). A batch returns in two objects: the messages, which the driver reads, and
the clips' crops, which it never reads: they stay in Ray's object store, referenced by
`RemoteCrops`, until the encoder actor fetches them, so a crop is serialised once, by the
camera, wherever the encoder runs. Both objects are owned by the driver (they are its calls'
results), so crops in flight outlive a camera actor that is killed; crops lost with a node
are set aside by the encoder, not retried for ever.

Faults: an actor that dies (killed, its node lost) fails its camera alone, exactly like a
worker process that dies; supervision restarts live cameras in a new actor. An encoder actor
that dies is replaced, and its batch retried.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import uuid
from dataclasses import dataclass, replace

import numpy as np

from tracking.redact import log_with_redaction

from tracking.types import FrameDetections

from ..config import CameraConfig, DetectorConfig, ReidConfig
from . import BackendError, take_waiting
from ..encoder_service import EncoderInfo, LocalEncoder
from ..worker import Finished, Output, WorkerSettings, _Outbox, run_camera

LOG = logging.getLogger(__name__)
NAMESPACE = "keyreid"
ACTOR_PREFIX = "keyreid-camera-"  # + camera id + "-" + a random suffix (restarts get new names)
ENCODER_PREFIX = "keyreid-encoder-"  # + a random suffix
DETECTOR_PREFIX = "keyreid-detector-"  # + a random suffix
FORWARDED_ENV = ("KEYREID_", "YOLO_", "HF_HUB_")  # offline switches and test hooks reach actors
TAKE_WAIT_S = 0.5  # how long one `take` waits for a first message
TAKE_LIMIT = 64
CONNECT_TIMEOUT_S = 5  # per attempt when joining a cluster (Ray's own default: minutes in all)


@dataclass(frozen=True)
class RemoteCrops:
    """A clip's crops where the Ray backend keeps them: item `index` of the crops object `ref`."""

    ref: object  # ray.ObjectRef of a list of uint8 [T, H, W, 3] arrays
    index: int


class CameraActor:
    """One camera's stage on a Ray worker: `run` in one thread, `take` and `stop` beside it."""

    def __init__(self, camera_id: str, log_level: int, queue_size: int) -> None:
        log_with_redaction(log_level, f"%(asctime)s %(levelname)s [camera {camera_id}] %(message)s")
        self.out: queue.Queue = queue.Queue(queue_size)
        self.stop_flag = threading.Event()

    def run(self, camera: CameraConfig, settings: WorkerSettings, detector=None) -> None:
        """`detector`: the shared detector actor (None: this camera runs its own)."""
        tracker = None
        if detector is not None:
            import ray

            from tracking.detector import SharedDetectorTracker

            tracker = SharedDetectorTracker(lambda image: ray.get(detector.detect.remote(image)),
                                            settings.detector.tracker)
        run_camera(camera, settings, _Outbox(self.out, settings.policy, settings.pending_clips),
                   self.stop_flag, tracker)

    def take(self, limit: int) -> tuple[list, list[np.ndarray]]:
        """Up to `limit` messages (waiting up to `TAKE_WAIT_S` for the first) and their crops,
        each clip's `crops` replaced by its index in the second list."""
        try:
            messages = [self.out.get(timeout=TAKE_WAIT_S)]
        except queue.Empty:
            return [], []
        while len(messages) < limit:
            try:
                messages.append(self.out.get_nowait())
            except queue.Empty:
                break
        crops: list[np.ndarray] = []
        for position, message in enumerate(messages):
            if isinstance(message, Output) and message.clips:
                clips = []
                for clip in message.clips:
                    clips.append(replace(clip, crops=len(crops)))
                    crops.append(clip.crops)
                messages[position] = replace(message, clips=clips)
        return messages, crops

    def stop(self) -> None:
        self.stop_flag.set()


class DetectorActor:
    """The shared detector: frames of many cameras batched into one forward pass.

    An asyncio actor: each camera's `detect` call waits on a future; a batch runs when
    `batch_size` frames wait or the oldest has waited `max_wait` seconds, one batch at a time
    (a single-thread executor), so frames arriving during a forward pass form the next batch.
    Stateless (trackers stay in the cameras), so Ray restarts it and retries its calls.
    (Ray Serve's `serve.batch` does the same, but needs Serve's web stack.)
    """

    def __init__(self, config: DetectorConfig) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from tracking.detector import PoseDetector, find_pose_weights

        self.detector = PoseDetector(config.weights or find_pose_weights(), imgsz=config.imgsz,
                                     conf=config.conf, iou=config.iou, device=config.device)
        self.batch_size, self.max_wait = config.batch_size, config.max_wait
        self.waiting: list = []  # (frame, future)
        self.flush_timer = None
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.batch_sizes: list[int] = []

    async def detect(self, image: np.ndarray) -> FrameDetections:
        import asyncio

        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((image, future))
        if len(self.waiting) >= self.batch_size:
            await self._run_batch()
        elif self.flush_timer is None:
            self.flush_timer = loop.call_later(self.max_wait,
                                               lambda: asyncio.ensure_future(self._run_batch()))
        return await future

    async def _run_batch(self) -> None:
        import asyncio

        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        batch, self.waiting = self.waiting[:self.batch_size], self.waiting[self.batch_size:]
        if not batch:
            return
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.pool, self.detector.detect, [image for image, _ in batch])
        except Exception as exc:  # noqa: BLE001 - each waiting camera gets the error
            for _, future in batch:
                future.set_exception(exc)
        else:
            self.batch_sizes.append(len(batch))
            for (_, future), result in zip(batch, results):
                future.set_result(result)
        if self.waiting and self.flush_timer is None:
            self.flush_timer = asyncio.get_running_loop().call_later(
                self.max_wait, lambda: asyncio.ensure_future(self._run_batch()))

    async def batches(self) -> list[int]:
        """The size of every batch so far (how well cameras share the forward passes)."""
        return list(self.batch_sizes)


class EncoderActor:
    """The encoder's model on a Ray worker (a GPU one where the cluster has GPUs)."""

    def __init__(self, config: ReidConfig) -> None:
        self.local = LocalEncoder(config)

    def info(self) -> EncoderInfo:
        return self.local.info

    def encode_clips(self, crops: list[RemoteCrops], keypoints: np.ndarray,
                     cameras: list[str | None]) -> np.ndarray:
        """Fetch the crops from the object store and encode them; clips whose crops were lost
        (their node died) get a non-finite descriptor, which the watcher sets aside."""
        import ray

        fetched: dict = {}
        for ref in {c.ref for c in crops}:
            try:
                fetched[ref] = ray.get(ref)
            except ray.exceptions.ObjectLostError as exc:
                logging.getLogger(__name__).error("crops lost with their node: %s", exc)
                fetched[ref] = None
        present = [i for i, c in enumerate(crops) if fetched[c.ref] is not None]
        descriptors = np.full((len(crops), self.local.info.dim), np.nan, dtype=np.float32)
        if present:
            arrays = [fetched[crops[i].ref][crops[i].index] for i in present]
            descriptors[present] = self.local.encode_clips(arrays, keypoints[present],
                                                           [cameras[i] for i in present])
        return descriptors


class RayCamera:
    """The driver's side of one camera actor: a reader thread takes its message batches."""

    def __init__(self, actor, run_ref, camera_id: str) -> None:
        self.actor = actor
        self.run_ref = run_ref
        self.camera_id = camera_id
        self.messages: queue.Queue = queue.Queue(maxsize=8)  # small: back-pressure reaches the actor
        self.died: str | None = None
        self.thread = threading.Thread(target=self._read, name=f"ray-inbox-{camera_id}",
                                       daemon=True)
        self.thread.start()

    def _read(self) -> None:
        import ray

        while True:
            try:
                messages_ref, crops_ref = self.actor.take.options(num_returns=2).remote(TAKE_LIMIT)
                messages = ray.get(messages_ref)
            except ray.exceptions.RayActorError as exc:
                self.died = _first_line(exc)
                return
            for message in messages:
                if isinstance(message, Output) and message.clips:
                    message = replace(message, clips=[replace(c, crops=RemoteCrops(crops_ref, c.crops))
                                                      for c in message.clips])
                self.messages.put(message)
                if isinstance(message, Finished):
                    self._release()
                    return

    def _release(self) -> None:
        """The camera has said its last: free the actor's CPUs once its run returns."""
        import ray

        ray.wait([self.run_ref], timeout=5.0)
        ray.kill(self.actor, no_restart=True)

    def take(self, limit: int) -> list:
        return take_waiting(self.messages, limit)

    def reader_alive(self) -> bool:
        return self.thread.is_alive()

    def is_alive(self) -> bool:
        import ray

        ready, _ = ray.wait([self.run_ref], timeout=0)
        return not ready

    def exit_reason(self) -> str:
        import ray

        try:
            ray.get(self.run_ref, timeout=1.0)
        except ray.exceptions.RayActorError as exc:
            return f"Ray actor died: {_first_line(exc)}"
        except Exception as exc:  # noqa: BLE001 - whatever ended it is the camera's reason
            return f"Ray actor failed: {type(exc).__name__}: {_first_line(exc)}"
        return "Ray actor ended without a last message"

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)

    def join(self, timeout: float) -> None:
        import ray

        ray.wait([self.run_ref], timeout=timeout)


class RemoteEncoder:
    """The driver's side of the encoder actor; a dead actor is replaced (its batch retried)."""

    def __init__(self, start) -> None:
        import ray

        self._start = start
        self.actor = start()
        self.info: EncoderInfo = ray.get(self.actor.info.remote())

    def encode_clips(self, crops: list[RemoteCrops], keypoints: np.ndarray,
                     cameras: list[str | None]) -> np.ndarray:
        import ray

        try:
            return ray.get(self.actor.encode_clips.remote(crops, keypoints, cameras))
        except ray.exceptions.RayActorError:
            LOG.error("the encoder actor died; starting another (the batch is retried)")
            self.actor = self._start()
            raise


class RayBackend:
    name = "ray"

    def __init__(self, queue_size: int, address: str | None, cameras: int = 1,
                 threads: int = 1) -> None:
        if address is not None:
            _check_reachable(address)  # before importing Ray: a wrong address fails at once
        try:
            import ray
        except ImportError as exc:
            raise BackendError("--backend ray needs Ray: pip install 'keyreid[site]' "
                               "(or pip install ray)") from exc
        self.ray = ray
        self.queue_size = queue_size
        self.threads = max(1, threads)
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        options: dict = {"namespace": NAMESPACE, "logging_level": logging.WARNING,
                         "runtime_env": {"env_vars": env} if env else None}
        if address is None:  # a Ray instance of our own on this machine, sized like `local`
            options.update(address="local", include_dashboard=False,
                           num_cpus=max(os.cpu_count() or 1, cameras * self.threads + 1))
        else:
            # Ray retries a cluster it cannot join for minutes; give up after ~20 s instead.
            for knob in ("RAY_gcs_rpc_server_connect_timeout_s",
                         "RAY_gcs_rpc_server_reconnect_timeout_s"):
                os.environ.setdefault(knob, str(CONNECT_TIMEOUT_S))
            options["address"] = address
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            hint = (" (is this process given the cluster's token: RAY_AUTH_TOKEN or "
                    "~/.ray/auth_token?)" if address else "")
            raise BackendError(f"could not start or join the Ray cluster at "
                               f"{address or 'this machine'}: {_first_line(exc)}{hint}") from exc
        resources = ray.cluster_resources()
        LOG.info("Ray cluster %s: %d node(s), %g CPU, %g GPU", address or "(local instance)",
                 len([n for n in ray.nodes() if n["Alive"]]), resources.get("CPU", 0),
                 resources.get("GPU", 0))
        wanted = cameras * self.threads
        if resources.get("CPU", 0) < wanted:
            LOG.warning("the Ray cluster has %g CPUs for %d camera(s) of %d thread(s): cameras "
                        "wait for a free CPU (add a node)", resources.get("CPU", 0), cameras,
                        self.threads)
        self.cameras: list[RayCamera] = []
        self.detector = None  # the shared detector actor, started with the first camera

    def _shared_detector(self, config: DetectorConfig):
        """The shared detector actor when the cameras use one (`detector.service`), else None."""
        gpus = self.ray.cluster_resources().get("GPU", 0)
        shared = config.service == "shared" or (
            config.service == "auto" and gpus >= 1 and config.device != "cpu")
        if not shared:
            return None
        if self.detector is None:
            placement = ({"num_gpus": 0.5, "num_cpus": 1} if gpus >= 1 and config.device != "cpu"
                         else {"num_cpus": config.threads or 1})
            LOG.info("shared detector actor (batches of up to %d frames): %s", config.batch_size,
                     ", ".join(f"{k} {v}" for k, v in placement.items()))
            self.detector = self.ray.remote(DetectorActor).options(
                name=f"{DETECTOR_PREFIX}{uuid.uuid4().hex[:8]}", max_restarts=-1,
                max_task_retries=-1, **placement).remote(config)
        return self.detector

    def start_camera(self, camera: CameraConfig, settings: WorkerSettings) -> RayCamera:
        actor_class = self.ray.remote(CameraActor).options(
            name=f"{ACTOR_PREFIX}{camera.id}-{uuid.uuid4().hex[:8]}",
            num_cpus=settings.detector.threads or self.threads, max_concurrency=3,
            max_restarts=0)
        actor = actor_class.remote(camera.id, settings.log_level, self.queue_size)
        detector = self._shared_detector(settings.detector)
        handle = RayCamera(actor, actor.run.remote(camera, settings, detector), camera.id)
        self.cameras.append(handle)
        return handle

    def stop_cameras(self) -> None:
        for handle in self.cameras:
            if handle.reader_alive():
                handle.actor.stop.remote()

    def encoder(self, config: ReidConfig) -> RemoteEncoder:
        gpus = self.ray.cluster_resources().get("GPU", 0)
        if gpus >= 1 and config.device != "cpu":
            placement = {"num_gpus": 0.5, "num_cpus": 1}  # the other half: the shared detector
        else:
            placement = {"num_cpus": config.threads or 1}
        LOG.info("encoder actor: %s", ", ".join(f"{k} {v}" for k, v in placement.items()))
        actor_class = self.ray.remote(EncoderActor)
        return RemoteEncoder(lambda: actor_class.options(
            name=f"{ENCODER_PREFIX}{uuid.uuid4().hex[:8]}", max_restarts=0, **placement
        ).remote(config))

    def close(self) -> None:
        for handle in self.cameras:
            handle.kill()
        if self.detector is not None:
            LOG.info("shared detector: %s", _batch_report(self.ray.get(self.detector.batches.remote())))
        self.ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail at once, saying so, when nothing listens at a HOST:PORT address."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", a ray:// URL: Ray resolves them
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise BackendError(f"no Ray cluster at {address}: {exc} (start one with `ray start "
                           f"--head --port {port}`, or check --ray-address)") from exc


def _batch_report(sizes: list[int]) -> str:
    if not sizes:
        return "no batches"
    return (f"{sum(sizes)} frames in {len(sizes)} batches (mean {np.mean(sizes):.1f} frames, "
            f"largest {max(sizes)})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
