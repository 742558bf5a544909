"""Video sources over PyAV: files, network streams (RTSP / HTTP) and webcams.

A `VideoSource` is an iterable of `VideoFrame`s for one camera. It owns everything about
getting frames in: opening, decoding, skipping corrupt packets, an optional crop (so one
physical video can serve as several virtual cameras), frame sampling (stride and/or an fps
limit), real-time pacing for files, and reconnection with exponential backoff for live
sources. Every failure is a `SourceError` naming the source and the reason.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from .redact import redact
from .types import VideoFrame

LOG = logging.getLogger(__name__)

_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
CACHE_ENV = "KEYREID_CACHE"
LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "udp", "rtp", "srt", "tcp")
_DEFAULT_FPS = 25.0  # only used when a stream has neither timestamps nor a frame rate


class UnsetVariable(KeyError):
    """A `${NAME}` without a default names an environment variable that is not set."""


def default_cache_dir() -> Path:
    """Where the demo video and detector weights are fetched: $KEYREID_CACHE or ~/.cache/keyreid."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/keyreid").expanduser()


def expand_variables(text: str) -> str:
    """`${NAME}` / `${NAME:-default}` from the environment; `${KEYREID_CACHE}` is always defined
    (`default_cache_dir`). Sources are stored as written, variables unexpanded (they may hold
    credentials), so whoever opens a stored source again expands it here, as the watcher did."""
    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name == CACHE_ENV:
            return str(default_cache_dir())
        found = os.environ.get(name)
        if found is None and default is None:
            raise UnsetVariable(name)
        return found if found is not None else default
    return _VAR_RE.sub(substitute, text)


class SourceError(RuntimeError):
    """A video source could not be opened or read; the message names the source and why."""

    def __init__(self, source: str, reason: str) -> None:
        source, reason = redact(source), redact(reason)  # FFmpeg's messages name the URL
        super().__init__(f"video source {source!r}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class ReconnectPolicy:
    """Exponential backoff for sources that can come back (network streams, webcams).

    The delay before attempt n (1-based) is min(initial_delay * multiplier**(n-1), max_delay);
    `max_attempts=None` retries forever. The attempt count resets once a frame arrives.
    """

    initial_delay: float = 1.0
    max_delay: float = 30.0
    multiplier: float = 2.0
    max_attempts: int | None = None

    def delay(self, attempt: int) -> float:
        return min(self.initial_delay * self.multiplier ** (attempt - 1), self.max_delay)


@dataclass
class SourceStats:
    """Counters a status line can show; updated while the source is iterated (read them from
    any thread: a worker reports `state` even while the source waits to reconnect).

    `state`: "connecting" (opening, first time), "streaming", "reconnecting" (waiting or
    re-opening after `last_error`; `attempt` counts tries since the last frame) or "ended".
    """

    frames_decoded: int = 0
    frames_yielded: int = 0
    corrupt_packets: int = 0
    reconnects: int = 0
    last_error: str | None = None
    state: str = "connecting"
    attempt: int = 0


@dataclass(frozen=True)
class _Target:
    """Where and how to open a source: the string FFmpeg gets plus its format and options."""

    url: str
    kind: str  # "file", "url" or "webcam"
    format: str | None = None
    options: dict[str, str] = field(default_factory=dict)


def _resolve(source: str | int | Path, options: dict[str, str] | None) -> _Target:
    opts = dict(options or {})
    if isinstance(source, int) or (isinstance(source, str) and source.isdigit()):
        return _Target(f"/dev/video{int(source)}", "webcam", "v4l2", opts)
    text = str(source)
    if text.startswith("/dev/video"):
        return _Target(text, "webcam", "v4l2", opts)
    if _URL_RE.match(text):
        scheme = text.split("://", 1)[0].lower()
        if scheme in ("rtsp", "rtsps"):
            opts.setdefault("rtsp_transport", "tcp")
        return _Target(text, "url", None, opts)
    return _Target(text, "file", None, opts)


class VideoSource:
    """Frames of one camera, as `VideoFrame`s (RGB uint8).

    Args:
        source: a file path, a URL (`rtsp://`, `http(s)://`, ...), a webcam index (0 or "0"
            -> v4l2 `/dev/video0`) or a `/dev/videoN` path.
        crop: (x, y, w, h) in pixels of the decoded frame, applied to every frame.
        stride: keep every `stride`-th decoded frame.
        max_fps: keep at most this many frames per second of stream time (after `stride`).
        realtime: pace a file to its stream time (sleep), as if it were a live camera.
        live: treat the source as a live stream: it is reconnected on errors *and* on end of
            stream, and the stream time keeps counting across reconnects. Default: True for
            webcams and RTSP/RTMP/UDP URLs, False for files and HTTP(S) URLs.
        reconnect: backoff policy for URLs and webcams (None: never reconnect). An HTTP(S)
            source that is not live is re-opened after an error and resumes after the last
            frame it delivered; end of stream ends it.
        open_timeout, read_timeout: seconds FFmpeg waits to open a network stream and for
            data once open, so a stalled stream raises instead of hanging.
        options: extra FFmpeg options (e.g. {"rtsp_transport": "udp"}).
        name: how messages name the source (default: the source string, credentials hidden).

    Iterating opens the source; `stop()` (from another thread) ends an iteration promptly,
    including during a backoff sleep. `stats` counts frames, skipped corrupt packets and
    reconnects.
    """

    def __init__(self, source: str | int | Path, *, crop: tuple[int, int, int, int] | None = None,
                 stride: int = 1, max_fps: float | None = None, realtime: bool = False,
                 live: bool | None = None, reconnect: ReconnectPolicy | None = ReconnectPolicy(),
                 open_timeout: float = 10.0, read_timeout: float = 10.0,
                 options: dict[str, str] | None = None, name: str | None = None) -> None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if max_fps is not None and max_fps <= 0:
            raise ValueError(f"max_fps must be > 0, got {max_fps}")
        if crop is not None and (len(crop) != 4 or crop[2] <= 0 or crop[3] <= 0
                                 or crop[0] < 0 or crop[1] < 0):
            raise ValueError(f"crop must be (x, y, w, h) with x, y >= 0 and w, h > 0, got {crop}")
        self._target = _resolve(source, options)
        self.name = redact(name or str(source))
        self.crop = tuple(int(v) for v in crop) if crop is not None else None
        self.stride = stride
        self.max_fps = max_fps
        self.realtime = realtime
        if live is None:
            scheme = self._target.url.split("://", 1)[0].lower() if self.kind == "url" else ""
            live = self.kind == "webcam" or scheme in LIVE_SCHEMES
        self.live = live
        self.reconnect = reconnect if self.kind != "file" else None
        self.open_timeout = open_timeout
        self.read_timeout = read_timeout
        self.stats = SourceStats()
        self._stop = threading.Event()

    @property
    def kind(self) -> str:
        """"file", "url" or "webcam"."""
        return self._target.kind

    def stop(self) -> None:
        """Ask a running iteration to end at the next frame (or backoff sleep)."""
        self._stop.set()

    def _error(self, reason: str) -> SourceError:
        error = SourceError(self.name, reason)
        self.stats.last_error = error.reason
        return error

    def _open(self) -> av.container.InputContainer:
        target = self._target
        if target.kind == "file":
            path = Path(target.url)
            if not path.exists():
                raise self._error(f"file not found: {path}")
            if not path.is_file():
                raise self._error(f"not a regular file: {path}")
        kwargs: dict = {"options": target.options}
        if target.format:
            kwargs["format"] = target.format
        if target.kind != "file":
            kwargs["timeout"] = (self.open_timeout, self.read_timeout)
        try:
            container = av.open(target.url, **kwargs)
        except (av.FFmpegError, OSError) as exc:
            raise self._error(f"cannot open ({_describe(exc)})") from exc
        if not container.streams.video:
            container.close()
            raise self._error("no video stream (not a video?)")
        stream = container.streams.video[0]
        if self.crop is not None:
            x, y, w, h = self.crop
            width, height = stream.codec_context.width, stream.codec_context.height
            if width and height and (x + w > width or y + h > height):
                container.close()
                raise self._error(f"crop (x={x}, y={y}, w={w}, h={h}) lies outside the "
                                  f"{width}x{height} frame")
        return container

    def __iter__(self) -> Iterator[VideoFrame]:
        self._stop.clear()
        sampler = _Sampler(self.stride, self.max_fps)
        pacer = _Pacer() if self.realtime else None
        stats = self.stats
        attempt = 0
        connection = 0
        resume_after = -1  # last decoded index delivered: a re-opened non-live source skips to it
        index_offset = 0  # live sources keep counting frames and time across reconnects
        time_offset = 0.0
        last_index, last_time, last_wall = -1, 0.0, 0.0
        file_wall_start: float | None = None  # a file's frames: this wall time + stream time
        try:
            while not self._stop.is_set():
                try:
                    container = self._open()
                except SourceError as exc:
                    if self.reconnect is None:
                        raise
                    attempt += 1
                    if not self._backoff(attempt, exc.reason):
                        if self._stop.is_set():
                            return
                        raise self._error(f"gave up after {attempt - 1} reconnect attempts: "
                                          f"{exc.reason}") from exc
                    continue
                connection += 1
                first_in_connection = True
                try:
                    for raw_index, pts_time, decoded in self._decode(container):
                        wall = time.time()
                        if self.live:
                            if first_in_connection:
                                # The stream clock continues across a reconnect and includes the
                                # outage, so times stay close to the wall clock.
                                index_offset = last_index + 1
                                time_offset = (last_time + max(wall - last_wall,
                                                               1.0 / self._fps(container))
                                               - pts_time if last_index >= 0 else 0.0)
                            index, stamp = raw_index + index_offset, pts_time + time_offset
                        else:
                            if raw_index <= resume_after:
                                continue
                            index, stamp = raw_index, pts_time
                            if file_wall_start is None:
                                file_wall_start = wall - pts_time
                            wall = file_wall_start + pts_time
                        first_in_connection = False
                        attempt = 0
                        stats.state, stats.attempt = "streaming", 0
                        last_index, last_time, last_wall = index, stamp, wall
                        resume_after = raw_index
                        if not sampler.keep(index, stamp):
                            continue
                        if pacer is not None:
                            pacer.wait(stamp, self._stop)
                        if self._stop.is_set():
                            return
                        stats.frames_yielded += 1
                        yield VideoFrame(index=index, time=stamp, image=self._image(decoded),
                                         wall_time=wall, connection=connection)
                    if not self.live or self.reconnect is None:
                        return
                    reason = "end of stream"
                except SourceError as exc:
                    if self.reconnect is None:
                        raise
                    reason = exc.reason
                finally:
                    container.close()
                attempt += 1
                if not self._backoff(attempt, reason):
                    if self._stop.is_set():
                        return
                    raise self._error(f"gave up after {attempt - 1} reconnect attempts: {reason}")
        finally:
            stats.state = "ended"

    def _backoff(self, attempt: int, reason: str) -> bool:
        """Sleep before reconnect attempt `attempt`; False when the policy says give up."""
        policy = self.reconnect
        if policy is None or (policy.max_attempts is not None and attempt > policy.max_attempts):
            return False
        delay = policy.delay(attempt)
        self.stats.reconnects += 1
        self.stats.state, self.stats.attempt = "reconnecting", attempt
        self.stats.last_error = redact(reason)
        LOG.warning("video source %r: %s; reconnecting in %.2f s (attempt %d%s)", self.name,
                    redact(reason), delay, attempt,
                    f"/{policy.max_attempts}" if policy.max_attempts is not None else "")
        return not self._stop.wait(delay)

    @staticmethod
    def _fps(container: av.container.InputContainer) -> float:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return float(rate) if rate else _DEFAULT_FPS

    def _decode(self, container: av.container.InputContainer) -> Iterator[tuple[int, float, av.VideoFrame]]:
        """Yield (decoded index, stream time, decoded frame), skipping packets that fail to decode."""
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = self._fps(container)
        index = 0
        last_time: float | None = None
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except (StopIteration, av.EOFError):
                if not self.live:
                    self._check_complete(container, index, last_time)
                return
            except av.ExitError as exc:  # FFmpeg's interrupt: the read timeout expired
                raise self._error(f"stalled: no data for {self.read_timeout:g} s after "
                                  f"{index} frames") from exc
            except (av.FFmpegError, OSError) as exc:
                raise self._error(f"read failed after {index} frames ({_describe(exc)})") from exc
            try:
                frames = packet.decode()
            except av.InvalidDataError as exc:
                self.stats.corrupt_packets += 1
                LOG.warning("video source %r: skipped a corrupt packet after frame %d (%s)",
                            self.name, index, _describe(exc))
                continue
            except av.FFmpegError as exc:
                raise self._error(f"decode failed after {index} frames ({_describe(exc)})") from exc
            for frame in frames:
                self.stats.frames_decoded += 1
                stamp = frame.time if frame.time is not None else index / fps
                last_time = float(stamp)
                yield index, last_time, frame  # converted to RGB only if the sampler keeps it
                index += 1

    def _check_complete(self, container: av.container.InputContainer, decoded: int,
                        last_time: float | None) -> None:
        """Raise when a finite stream ends well before what its header declares (truncated).

        Frame counts are not compared: FFmpeg drops a damaged frame silently, and one lost frame
        mid-file should not fail the camera. Containers that declare nothing reliable (MPEG-TS
        estimates its duration from the file size) cannot be checked: they simply end early.
        """
        fps = self._fps(container)
        if container.duration is None:
            return
        start = container.start_time / 1e6 if container.start_time is not None else 0.0
        declared = container.duration / 1e6
        reached = (last_time - start + 1.0 / fps) if last_time is not None else 0.0
        if declared - reached > max(2.0 / fps, 0.5):
            raise self._error(f"truncated or corrupt: stream ended at {reached:.2f} s of the "
                              f"{declared:.2f} s the file declares ({decoded} frames decoded)")

    def _image(self, frame: av.VideoFrame) -> np.ndarray:
        image = frame.to_ndarray(format="rgb24")
        if self.crop is None:
            return image
        x, y, w, h = self.crop
        if x + w > image.shape[1] or y + h > image.shape[0]:
            raise self._error(f"crop (x={x}, y={y}, w={w}, h={h}) lies outside the "
                              f"{image.shape[1]}x{image.shape[0]} frame")
        return np.ascontiguousarray(image[y:y + h, x:x + w])


class LatestFrames:
    """A live source that stays current: a reader thread takes frames as fast as the source
    delivers them and keeps only the newest; iterating yields the newest frame each time.

    When processing is slower than the camera, frames are skipped (counted in `skipped`), never
    queued, so the consumer never falls behind real time. Errors of the source are raised in
    the consumer; `stop()` ends both sides promptly.
    """

    def __init__(self, source: VideoSource) -> None:
        self.source = source
        self.skipped = 0
        self._latest: VideoFrame | None = None
        self._done = False
        self._error: BaseException | None = None
        self._ready = threading.Condition()
        self._stopped = threading.Event()

    @property
    def stats(self) -> SourceStats:
        return self.source.stats

    def stop(self) -> None:
        self._stopped.set()
        self.source.stop()
        with self._ready:
            self._ready.notify_all()

    def _read(self) -> None:
        try:
            for frame in self.source:
                with self._ready:
                    if self._latest is not None:
                        self.skipped += 1
                    self._latest = frame
                    self._ready.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._error = exc
        finally:
            with self._ready:
                self._done = True
                self._ready.notify_all()

    def __iter__(self) -> Iterator[VideoFrame]:
        reader = threading.Thread(target=self._read, name=f"read-{self.source.name}", daemon=True)
        reader.start()
        try:
            while True:
                with self._ready:
                    self._ready.wait_for(lambda: self._latest is not None or self._done
                                         or self._stopped.is_set())
                    frame, self._latest = self._latest, None
                    if frame is None:
                        break
                yield frame
        finally:
            self.source.stop()
            reader.join(timeout=self.source.read_timeout + 1.0)
        if self._error is not None and not isinstance(self._error, GeneratorExit):
            raise self._error


class _Sampler:
    """Stride and fps limit: decides which decoded frames are kept."""

    def __init__(self, stride: int, max_fps: float | None) -> None:
        self.stride = stride
        self.period = 1.0 / max_fps if max_fps else 0.0
        self.next_time: float | None = None

    def keep(self, index: int, stamp: float) -> bool:
        if index % self.stride:
            return False
        if not self.period:
            return True
        # A small tolerance keeps e.g. every 3rd frame of a 30 fps stream at max_fps=10.
        if self.next_time is not None and stamp < self.next_time - 1e-3 * self.period:
            return False
        self.next_time = (stamp if self.next_time is None else self.next_time) + self.period
        if self.next_time <= stamp:  # after a gap, restart the grid at this frame
            self.next_time = stamp + self.period
        return True


class _Pacer:
    """Sleeps so that stream time advances no faster than wall time."""

    def __init__(self) -> None:
        self.start: tuple[float, float] | None = None  # (wall clock, stream time) at first frame

    def wait(self, stamp: float, stop: threading.Event) -> None:
        now = time.monotonic()
        if self.start is None:
            self.start = (now, stamp)
            return
        delay = (stamp - self.start[1]) - (now - self.start[0])
        if delay > 0:
            stop.wait(delay)


def _describe(exc: BaseException) -> str:
    """A short reason for an FFmpeg error: its message without the errno noise."""
    if isinstance(exc, av.FFmpegError):
        text = exc.strerror or str(exc)
        return f"{text}: {exc.filename}" if getattr(exc, "filename", None) else text
    return str(exc)
