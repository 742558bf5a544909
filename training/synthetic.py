"""A procedurally rendered stand-in for MARS / iLIDS-VID, written in their official layouts.

No real re-id data or weights exist offline here, yet the whole pipeline (loaders, keypoint
cache, sampling, training, evaluation, ablations) must run end to end and say something true
about keypoint guidance. So this module draws simple walking people (head, torso, arms, legs
from a 17-keypoint COCO skeleton with a gait cycle) seen by several cameras that differ in
background, lighting, colour cast, scale, viewpoint (front vs back: left and right swap) and
noise, and writes the exact keypoints into the `groundtruth` keypoint cache.

Keypoint guidance is made to matter: identities come in *families* that share hair, skin,
shirt, shoes and body proportions and differ in ONE body part only (trousers, sleeves or hair).
A global descriptor sees near-identical people; a part-aware one can look at the right place.
`families="swapped"` goes further: the members of a family share one palette of three colours
and differ only in which garment (shirt, sleeves, trousers) wears which, so no colour tells them
apart, only where it is: the set on which a global-only model should fail and parts should be
necessary (not yet shown by a multi-seed run, see the README).

Frames are 128x64 by default (iLIDS-VID's native size, a quarter of MARS's 256x128): enough
pixels for every part to be several pixels wide, and 4x cheaper to write, read and train on
the CPU. The model resizes to its own input size. The default (64 ids) generates in seconds.
"""
from __future__ import annotations

import colorsys
import dataclasses
import itertools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy.io

from reid.keypoints import COCO_KEYPOINTS, NUM_KEYPOINTS
from training.datasets import ILIDSVID_SEQUENCES, ILIDSVID_SPLIT_FILE, ilidsvid_tracklet_key, mars_tracklet_key
from training.records import keypoint_cache_path

LAYOUTS: tuple[str, ...] = ("mars", "ilidsvid")
VARYING_PARTS: tuple[str, ...] = ("trousers", "sleeves", "hair")
FAMILY_MODES: tuple[str, ...] = ("one_part", "swapped")
SWAPPED_GARMENTS: tuple[str, ...] = ("shirt", "sleeves", "trousers")
MARKER = "synthetic.json"
_K = {name: i for i, name in enumerate(COCO_KEYPOINTS)}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines the generated dataset (it is a pure function of this)."""

    layout: str = "mars"
    num_ids: int = 64
    family_size: int = 4
    families: str = "one_part"  # or "swapped" (see the module docstring)
    num_cameras: int = 3  # iLIDS-VID layout always uses 2
    tracklets_per_camera: int = 2  # per identity (iLIDS-VID layout: 1)
    min_frames: int = 12
    max_frames: int = 24
    height: int = 128
    width: int = 64
    num_distractors: int = 8  # MARS layout: gallery-only tracklets with pid 0
    num_junk: int = 4  # MARS layout: badly cropped tracklets with pid -1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"synthetic layout {self.layout!r} not in {LAYOUTS}")
        if self.families not in FAMILY_MODES:
            raise ValueError(f"families={self.families!r} not in {FAMILY_MODES}")
        if self.families == "swapped" and self.family_size > 6:
            raise ValueError("families='swapped' permutes three colours: family_size must be <= 6")
        if self.num_ids < 2 * self.family_size or self.num_ids % self.family_size:
            raise ValueError(f"num_ids ({self.num_ids}) must be a multiple of family_size "
                             f"({self.family_size}) with at least two families")
        if self.layout == "ilidsvid" and self.num_ids % 2:
            raise ValueError("the iLIDS-VID layout splits ids in halves: num_ids must be even")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"bad frame range {self.min_frames}..{self.max_frames}")
        if self.layout == "mars" and self.num_cameras < 2:
            raise ValueError("at least two cameras are needed for cross-camera matching")


@dataclasses.dataclass(frozen=True)
class Appearance:
    """What makes an identity: RGB colours of each garment and body proportions."""

    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    shirt: tuple[float, float, float]
    stripes: tuple[float, float, float] | None
    sleeves: tuple[float, float, float]
    trousers: tuple[float, float, float]
    shoes: tuple[float, float, float]
    height_scale: float
    width_scale: float
    leg_ratio: float


@dataclasses.dataclass(frozen=True)
class Camera:
    """Per-camera rendering conditions."""

    background: np.ndarray  # H x W x 3 float32 RGB
    gain: np.ndarray  # per-channel multiplier: brightness and colour cast
    person_height: float  # fraction of the frame height
    facing_front: bool  # False: seen from the back, left and right swap in the image
    noise: float
    blur: bool


def _colour(rng: np.random.Generator, hue: float | None = None) -> tuple[float, float, float]:
    hue = rng.random() if hue is None else hue
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.45, 0.95), rng.uniform(0.35, 0.95))
    return (255 * r, 255 * g, 255 * b)


def _distinct_colours(rng: np.random.Generator, count: int) -> list[tuple[float, float, float]]:
    """`count` colours with evenly spread hues (random offset), so family members stay separable."""
    offset = rng.random()
    hues = [(offset + i / count) for i in rng.permutation(count)]
    return [_colour(rng, h) for h in hues]


def _random_appearance(rng: np.random.Generator) -> Appearance:
    skin_tone = rng.uniform(0.3, 0.95)
    skin = (255 * skin_tone, 200 * skin_tone + 20, 160 * skin_tone + 20)
    hair = _colour(rng) if rng.random() < 0.3 else tuple(float(v) for v in rng.uniform(10, 120) * np.array([1.0, 0.8, 0.6]))
    return Appearance(
        skin=skin, hair=hair, shirt=_colour(rng),
        stripes=_colour(rng) if rng.random() < 0.35 else None,
        sleeves=_colour(rng), trousers=_colour(rng),
        shoes=tuple(float(v) for v in rng.uniform(0, 200, 3)),
        height_scale=rng.uniform(0.88, 1.04), width_scale=rng.uniform(0.85, 1.2), leg_ratio=rng.uniform(0.44, 0.54),
    )


def make_identities(config: SyntheticConfig, rng: np.random.Generator) -> list[tuple[Appearance, str]]:
    """Appearances of all identities, family by family, with the part that tells members apart."""
    identities = []
    for _ in range(config.num_ids // config.family_size):
        base = _random_appearance(rng)
        if config.families == "swapped":
            colours = _distinct_colours(rng, len(SWAPPED_GARMENTS))
            orders = list(itertools.permutations(range(len(SWAPPED_GARMENTS))))
            for choice in rng.permutation(len(orders))[:config.family_size]:
                worn = {garment: colours[i] for garment, i in zip(SWAPPED_GARMENTS, orders[choice])}
                identities.append((dataclasses.replace(base, stripes=None, **worn), "swapped"))
            continue
        part = VARYING_PARTS[int(rng.integers(len(VARYING_PARTS)))]
        for colour in _distinct_colours(rng, config.family_size):
            identities.append((dataclasses.replace(base, **{part: colour}), part))
    return identities


def make_camera(config: SyntheticConfig, index: int, rng: np.random.Generator) -> Camera:
    """A camera: wall + floor background with some clutter, lighting, scale and viewpoint."""
    h, w = config.height, config.width
    wall, floor = np.array(_colour(rng)), np.array(_colour(rng)) * 0.7
    horizon = int(h * rng.uniform(0.55, 0.75))
    ramp = np.linspace(0.85, 1.15, h, dtype=np.float32)[:, None, None]
    background = np.empty((h, w, 3), np.float32)
    background[:horizon] = wall
    background[horizon:] = floor
    background *= ramp
    for _ in range(int(rng.integers(2, 6))):  # posters, doors, shelves
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, horizon))
        x1, y1 = x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 3))
        cv2.rectangle(background, (x0, y0), (x1, y1), _colour(rng), -1)
    background = cv2.GaussianBlur(background, (3, 3), 0)
    gain = rng.uniform(0.7, 1.25) * rng.uniform(0.85, 1.15, 3)
    return Camera(background=background, gain=gain.astype(np.float32), person_height=float(rng.uniform(0.74, 0.92)),
                  facing_front=index % 2 == 0, noise=float(rng.uniform(2.0, 7.0)), blur=bool(rng.random() < 0.3))


def skeleton(h: float, cx: float, foot_y: float, phase: float, look: Appearance, facing_front: bool) -> np.ndarray:
    """COCO keypoints `[17, 3]` of a person `h` pixels tall walking toward (or away from) the
    camera at gait `phase`. Image-left limbs are the person's right when facing the camera."""
    ws = look.width_scale
    lift = (max(0.0, np.sin(phase)), max(0.0, -np.sin(phase)))  # image-left, image-right leg
    bob = 0.012 * h * abs(np.cos(phase))
    cx = cx + 0.012 * h * np.sin(phase)
    top = foot_y - bob
    hip_y = top - look.leg_ratio * h
    shoulder_y = top - 0.80 * h
    head_y = top - 0.915 * h
    points: dict[str, tuple[float, float]] = {}
    for side, sign in (("l", -1.0), ("r", 1.0)):  # image-left / image-right
        own, other = lift[0 if side == "l" else 1], lift[1 if side == "l" else 0]
        leg = foot_y - hip_y
        points[f"{side}_shoulder"] = (cx + sign * 0.12 * h * ws, shoulder_y)
        points[f"{side}_elbow"] = (cx + sign * 0.145 * h * ws, shoulder_y + 0.17 * h - 0.02 * h * other)
        points[f"{side}_wrist"] = (cx + sign * (0.15 - 0.03 * other) * h * ws, shoulder_y + 0.33 * h - 0.05 * h * other)
        points[f"{side}_hip"] = (cx + sign * 0.075 * h * ws, hip_y)
        points[f"{side}_knee"] = (cx + sign * (0.08 * h * ws + 0.01 * h * own), hip_y + 0.5 * leg - 0.035 * h * own)
        points[f"{side}_ankle"] = (cx + sign * 0.075 * h * ws, foot_y - 0.03 * h - 0.07 * h * own)
        points[f"{side}_eye"] = (cx + sign * 0.025 * h, head_y - 0.005 * h)
        points[f"{side}_ear"] = (cx + sign * 0.058 * h, head_y)
    points["nose"] = (cx, head_y + 0.015 * h)
    keypoints = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    for name, index in _K.items():
        if name == "nose":
            key = "nose"
        else:
            person_side, part = name.split("_", 1)
            image_left = (person_side == "right") == facing_front
            key = f"{'l' if image_left else 'r'}_{part}"
        keypoints[index] = (*points[key], 1.0)
    if not facing_front:  # the face is hidden from behind
        keypoints[[_K["nose"], _K["left_eye"], _K["right_eye"]], 2] = 0.0
    return keypoints


def draw_person(canvas: np.ndarray, keypoints: np.ndarray, h: float, look: Appearance, facing_front: bool) -> None:
    """Draw the body parts of one person onto `canvas` (float32 RGB) from its keypoints."""
    kp = {name: keypoints[i, :2] for name, i in _K.items()}

    def pt(p: np.ndarray) -> tuple[int, int]:
        return int(round(float(p[0]))), int(round(float(p[1])))

    def thick(f: float) -> int:
        return max(1, int(round(f * h * look.width_scale)))

    for side in ("left", "right"):
        cv2.line(canvas, pt(kp[f"{side}_hip"]), pt(kp[f"{side}_knee"]), look.trousers, thick(0.075), cv2.LINE_AA)
        cv2.line(canvas, pt(kp[f"{side}_knee"]), pt(kp[f"{side}_ankle"]), look.trousers, thick(0.065), cv2.LINE_AA)
        ankle = kp[f"{side}_ankle"]
        cv2.ellipse(canvas, pt(ankle + (0, 0.02 * h)), (thick(0.04), max(1, int(0.022 * h))), 0, 0, 360,
                    look.shoes, -1, cv2.LINE_AA)
    torso = np.array([kp["left_shoulder"], kp["right_shoulder"], kp["right_hip"], kp["left_hip"]])
    centre = torso.mean(axis=0)
    torso = centre + (torso - centre) * np.array([1.12, 1.05])
    mask = np.zeros(canvas.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(torso).astype(np.int32)], 1)
    canvas[mask > 0] = look.shirt
    if look.stripes is not None:
        period = max(2, int(0.05 * h))
        rows = (np.arange(canvas.shape[0]) // period) % 2 == 1
        canvas[(mask > 0) & rows[:, None]] = look.stripes
    cv2.line(canvas, pt((kp["left_shoulder"] + kp["right_shoulder"]) / 2),
             pt((kp["left_ear"] + kp["right_ear"]) / 2), look.skin, thick(0.05), cv2.LINE_AA)
    for side in ("left", "right"):
        cv2.line(canvas, pt(kp[f"{side}_shoulder"]), pt(kp[f"{side}_elbow"]), look.sleeves, thick(0.06), cv2.LINE_AA)
        cv2.line(canvas, pt(kp[f"{side}_elbow"]), pt(kp[f"{side}_wrist"]), look.sleeves, thick(0.05), cv2.LINE_AA)
        cv2.circle(canvas, pt(kp[f"{side}_wrist"] + (0, 0.02 * h)), max(1, int(0.025 * h)), look.skin, -1, cv2.LINE_AA)
    head = (kp["left_ear"] + kp["right_ear"]) / 2
    radius = max(2, int(round(0.068 * h)))
    if facing_front:
        cv2.circle(canvas, pt(head), radius, look.skin, -1, cv2.LINE_AA)
        cv2.ellipse(canvas, pt(head - (0, 0.012 * h)), (radius + 1, radius), 0, 180, 360, look.hair, -1, cv2.LINE_AA)
        for eye in ("left_eye", "right_eye"):
            cv2.circle(canvas, pt(kp[eye]), 0, (20.0, 20.0, 20.0), -1)
    else:
        cv2.circle(canvas, pt(head), radius + 1, look.hair, -1, cv2.LINE_AA)


def render_tracklet(config: SyntheticConfig, camera: Camera, look: Appearance, num_frames: int,
                    rng: np.random.Generator, x_offset: float = 0.0) -> tuple[list[np.ndarray], np.ndarray]:
    """Frames (uint8 RGB) and keypoints `[num_frames, 17, 3]` of one person walking in one camera.
    `x_offset` (fraction of the width) shifts the person off-centre, as a bad detection would."""
    h_img, w_img = config.height, config.width
    period = rng.uniform(8.0, 12.0)
    phase0 = rng.uniform(0, 2 * np.pi)
    height0 = camera.person_height * look.height_scale * h_img * rng.uniform(0.95, 1.05)
    growth = rng.uniform(-0.08, 0.08)  # walking toward / away from the camera
    cx0 = w_img * (0.5 + x_offset + rng.uniform(-0.04, 0.04))
    drift = w_img * rng.uniform(-0.08, 0.08)
    frames, keypoints = [], np.zeros((num_frames, NUM_KEYPOINTS, 3), np.float32)
    for t in range(num_frames):
        progress = t / max(1, num_frames - 1)
        h = height0 * (1 + growth * progress) * rng.uniform(0.99, 1.01)
        foot_y = h_img - 1 - 0.03 * h_img + rng.uniform(-0.5, 0.5)
        kp = skeleton(h, cx0 + drift * progress, foot_y, phase0 + 2 * np.pi * t / period, look, camera.facing_front)
        kp[:, :2] += rng.normal(0.0, 0.3, (NUM_KEYPOINTS, 2))  # small pose jitter (still exact: drawn from it)
        canvas = camera.background.copy()
        draw_person(canvas, kp, h, look, camera.facing_front)
        if camera.blur:
            canvas = cv2.GaussianBlur(canvas, (3, 3), 0)
        canvas = canvas * camera.gain + rng.normal(0.0, camera.noise, canvas.shape).astype(np.float32)
        frames.append(np.clip(canvas, 0, 255).astype(np.uint8))
        inside = (kp[:, 0] >= 0) & (kp[:, 0] <= w_img - 1) & (kp[:, 1] >= 0) & (kp[:, 1] <= h_img - 1)
        kp[~inside, 2] = 0.0
        keypoints[t] = kp
    return frames, keypoints


@dataclasses.dataclass
class _Tracklet:
    pid: int
    camid: int  # 0-based
    frames: list[np.ndarray]
    keypoints: np.ndarray
    split: str  # "train" or "test"


def _render_all(config: SyntheticConfig) -> list[_Tracklet]:
    rng = np.random.default_rng(config.seed)
    identities = make_identities(config, rng)
    num_cams = 2 if config.layout == "ilidsvid" else config.num_cameras
    per_cam = 1 if config.layout == "ilidsvid" else config.tracklets_per_camera
    cameras = [make_camera(config, c, rng) for c in range(num_cams)]
    num_families = config.num_ids // config.family_size
    test_families = set(rng.permutation(num_families)[: num_families // 2].tolist())

    def length() -> int:
        return int(rng.integers(config.min_frames, config.max_frames + 1))

    tracklets = []
    for index, (look, _) in enumerate(identities):
        split = "test" if index // config.family_size in test_families else "train"
        for camid, camera in enumerate(cameras):
            for _ in range(per_cam):
                frames, kp = render_tracklet(config, camera, look, length(), rng)
                tracklets.append(_Tracklet(index + 1, camid, frames, kp, split))
    if config.layout == "mars":
        for _ in range(config.num_distractors):
            camid = int(rng.integers(num_cams))
            frames, kp = render_tracklet(config, cameras[camid], _random_appearance(rng), length(), rng)
            tracklets.append(_Tracklet(0, camid, frames, kp, "test"))
        for j in range(config.num_junk):
            camid = int(rng.integers(num_cams))
            look = identities[int(rng.integers(len(identities)))][0]
            frames, kp = render_tracklet(config, cameras[camid], look, length(), rng,
                                         x_offset=0.55 if j % 2 else -0.55)
            tracklets.append(_Tracklet(-1, camid, frames, kp, "test"))
    return tracklets


def _write_rgb(path: Path, frame: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if path.suffix == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    if not cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), params):
        raise OSError(f"could not write {path}")


def _save_keypoints(root: Path, key: str, keypoints: np.ndarray) -> None:
    path = keypoint_cache_path(root, "groundtruth", key)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, keypoints.astype(np.float32))


def _mars_person(pid: int) -> str:
    return "00-1" if pid == -1 else f"{pid:04d}"


def _write_mars(root: Path, tracklets: list[_Tracklet], rng: np.random.Generator) -> None:
    counters: dict[tuple[int, int], int] = {}
    for split, home in (("train", "bbox_train"), ("test", "bbox_test")):
        names: list[str] = []
        rows, query_idx = [], []
        queried: set[tuple[int, int]] = set()
        chosen = [t for t in tracklets if t.split == split]
        for tracklet in chosen:
            number = counters[(tracklet.pid, tracklet.camid)] = counters.get((tracklet.pid, tracklet.camid), 0) + 1
            prefix = f"{_mars_person(tracklet.pid)}C{tracklet.camid + 1}T{number:04d}"
            start = len(names) + 1
            for f, frame in enumerate(tracklet.frames):
                name = f"{prefix}F{f + 1:03d}.jpg"
                _write_rgb(root / home / name[:4] / name, frame)
                names.append(name)
            rows.append([start, len(names), tracklet.pid, tracklet.camid + 1])
            _save_keypoints(root, mars_tracklet_key(home, f"{prefix}F001.jpg"), tracklet.keypoints)
            if split == "test" and tracklet.pid > 0 and (tracklet.pid, tracklet.camid) not in queried:
                queried.add((tracklet.pid, tracklet.camid))  # first tracklet per id and camera is a query
                query_idx.append(len(rows))
        info = root / "info"
        info.mkdir(parents=True, exist_ok=True)
        (info / f"{split}_name.txt").write_text("\n".join(names) + "\n")
        key = f"track_{split}_info"
        scipy.io.savemat(str(info / f"tracks_{split}_info.mat"), {key: np.array(rows, dtype=np.float64)})
        if split == "test":
            scipy.io.savemat(str(info / "query_IDX.mat"), {"query_IDX": np.array(query_idx, dtype=np.float64)[None]})


def _write_ilidsvid(root: Path, tracklets: list[_Tracklet], config: SyntheticConfig, rng: np.random.Generator) -> None:
    # Real iLIDS-VID person numbers have gaps (up to person319): mimic that so indices != numbers.
    numbers = np.sort(rng.choice(np.arange(1, int(config.num_ids * 1.1) + 2), config.num_ids, replace=False))
    for tracklet in tracklets:
        person = f"person{numbers[tracklet.pid - 1]:03d}"
        camera = tracklet.camid + 1
        first = int(rng.integers(1, 400))
        for f, frame in enumerate(tracklet.frames):
            _write_rgb(root / ILIDSVID_SEQUENCES / f"cam{camera}" / person / f"cam{camera}_{person}_{first + f:05d}.png",
                       frame)
        _save_keypoints(root, ilidsvid_tracklet_key(camera, person), tracklet.keypoints)
    ls_set = np.stack([rng.permutation(config.num_ids) + 1 for _ in range(10)]).astype(np.float64)
    (root / ILIDSVID_SPLIT_FILE).parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(root / ILIDSVID_SPLIT_FILE), {"ls_set": ls_set})


def generate_synthetic(root: str | Path, layout: str = "mars", **options: Any) -> SyntheticConfig:
    """Write a synthetic dataset in the official `layout` under `root` (which must not exist or
    be empty), with `groundtruth` keypoint caches and a `synthetic.json` marker holding the config.
    Options are the fields of `SyntheticConfig`. Deterministic given the config."""
    config = SyntheticConfig(layout=layout, **options)
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; refusing to write a synthetic dataset there")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        tracklets = _render_all(config)
        rng = np.random.default_rng([config.seed, 1])
        if layout == "mars":
            _write_mars(staging, tracklets, rng)
        else:
            _write_ilidsvid(staging, tracklets, config, rng)
        (staging / MARKER).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        if root.exists():
            root.rmdir()
        staging.rename(root)  # appears complete or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return config


def ensure_synthetic(root: str | Path, layout: str = "mars", **options: Any) -> SyntheticConfig:
    """Generate the dataset unless `root` already holds one made from the same config."""
    config = SyntheticConfig(layout=layout, **options)
    marker = Path(root) / MARKER
    if not marker.is_file():
        return generate_synthetic(root, layout=layout, **options)
    existing = SyntheticConfig(**json.loads(marker.read_text()))
    if existing != config:
        changed = {k: (getattr(existing, k), v) for k, v in dataclasses.asdict(config).items() if getattr(existing, k) != v}
        raise ValueError(f"{root} holds a synthetic dataset with a different config (existing, requested): {changed}")
    return existing
