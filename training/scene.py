"""A labelled synthetic multi-camera scene: rendered people walk through a corridor of cameras.

Why: scoring the watcher (tracking, re-id, cross-camera linking) needs videos whose every box
and identity is known. The people are `training.synthetic`'s rendered walkers (identities in
families that differ in one garment, so re-id is not trivial); YOLO11n-pose detects them at
the sizes used here (90-180 px tall in a 640x360 frame; checked with the real detector).

Layout: cameras cam0, cam1, ... are consecutive views of one corridor. A person walks across a
camera's view (left to right on a forward path, right to left on a reverse one), leaves, and
after that camera pair's transit time (divided by the person's walking-speed factor) enters the
next camera. Every fourth person visits a single camera only (a person the linker must leave
alone). Cameras differ in background, lighting, noise, person scale and viewpoint (odd cameras
see people from behind).

`python -m training.scene --out DIR [--people N] [--seconds S] [--cameras C] [--seed N]`
writes into DIR:

- `<camera>.mp4`: the camera's video (10 fps, 640x360, H.264 via `tracking.synthetic`).
- `<camera>.txt`: the truth, MOTChallenge-style text, one line per visible person per frame,
  no header, sorted by frame then id::

      frame,id,x,y,w,h,conf,x3d,y3d,z3d
      1,3,412.0,201.0,38.0,131.0,1,-1,-1,-1

  `frame` is 1-based (frame 1 is the video's first frame, the watcher's frame index 0); `id` a
  global person id >= 1, the same person having the same id in every camera; x, y, w, h the
  box (top-left corner, width, height) in camera pixels, i.e. the watcher's coordinates after
  a camera's crop (these cameras have none). The box is the extent of the drawn person's
  pixels, also where another person occludes them; a person cut by the frame edge is listed
  while at least half of their width is inside the frame, with the box clipped to it.
  `conf` is 1 (the box counts); the world coordinates are unused (-1). An empty file means
  nobody was visible in that camera.
- `scene.json`: the scene's parameters, per-pair transit times (seconds) and each person's
  visits (camera, first/last frame, 0-based, and entry/exit time in seconds).
- `cams.yaml`: a ready `keyreid-watch` config for these videos (database `scene.db` beside it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
from pathlib import Path

import cv2
import numpy as np

from tracking.synthetic import write_video
from training.synthetic import (Appearance, SyntheticConfig, draw_person, make_camera,
                                make_identities, skeleton)

FPS = 10
# H.264: PyAV's default-bitrate MPEG-4 smooths the rendered people into flat cartoons that
# YOLO11n-pose misses (7 of 36 test frames detected, 35 of 36 with H.264).
CODEC = "libx264"
WIDTH, HEIGHT = 640, 360
_WALK_HEIGHTS_PER_SECOND = 0.8  # ~1.4 m/s for a 1.75 m person
_MARGIN = 0.3  # people start and end this many body heights outside the frame


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Everything that determines a scene (it is a pure function of this)."""

    people: int = 8
    seconds: float = 40.0
    cameras: int = 2
    seed: int = 0
    family_size: int = 2
    transit: tuple[float, float] = (3.0, 6.0)  # range of a camera pair's transit time, seconds

    def __post_init__(self) -> None:
        if self.cameras < 2:
            raise ValueError(f"a multi-camera scene needs at least 2 cameras, got {self.cameras}")
        if self.people < 2 * self.family_size or self.people % self.family_size:
            raise ValueError(f"people ({self.people}) must be a multiple of family_size "
                             f"({self.family_size}) with at least two families")
        if self.seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {self.seconds}")

    @property
    def num_frames(self) -> int:
        return int(round(self.seconds * FPS))


@dataclasses.dataclass(frozen=True)
class Visit:
    """One person crossing one camera: where, when and how (all in that camera's frame)."""

    person: int
    camera: int
    enter_time: float  # the moment the person's centre is _MARGIN heights left/right of view
    height: float  # body height in pixels
    foot_y: float
    speed: float  # pixels per second, signed: > 0 walks left to right
    phase: float  # gait phase at entry
    period: float  # frames per gait cycle

    @property
    def exit_time(self) -> float:
        return self.enter_time + (WIDTH + 2 * _MARGIN * self.height) / abs(self.speed)

    def centre_x(self, t: float) -> float:
        start = -_MARGIN * self.height if self.speed > 0 else WIDTH + _MARGIN * self.height
        return start + self.speed * (t - self.enter_time)


@dataclasses.dataclass
class CameraTruth:
    """A camera's video frames (RGB) and truth rows (frame 0-based, person, x, y, w, h)."""

    frames: list[np.ndarray]
    rows: list[tuple[int, int, float, float, float, float]]


def _plan(config: SceneConfig, rng: np.random.Generator) -> tuple[list[Visit], list[float]]:
    """Each person's visits (a contiguous path through the corridor) and each pair's transit."""
    transits = [float(rng.uniform(*config.transit)) for _ in range(config.cameras - 1)]
    scales = [float(rng.uniform(0.30, 0.42)) * HEIGHT for _ in range(config.cameras)]
    visits: list[Visit] = []
    for k in range(config.people):
        forward = k % 2 == 0
        order = list(range(config.cameras)) if forward else list(range(config.cameras))[::-1]
        path = order[:1] if k % 4 == 3 else order
        pace = float(rng.uniform(0.85, 1.15))
        planned: list[Visit] = []
        t = 0.0
        for step, camera in enumerate(path):
            foot_y = HEIGHT * float(rng.uniform(0.80, 0.96))
            height = scales[camera] * foot_y / (0.96 * HEIGHT) * float(rng.uniform(0.9, 1.05))
            speed = pace * _WALK_HEIGHTS_PER_SECOND * height * (1 if forward else -1)
            visit = Visit(k + 1, camera, t, height, foot_y, speed,
                          float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(9.0, 11.0)))
            planned.append(visit)
            if step + 1 < len(path):
                pair = min(camera, path[step + 1])
                t = visit.exit_time + transits[pair] / pace
        duration = planned[-1].exit_time
        if duration > config.seconds:
            raise ValueError(f"seconds={config.seconds} is too short: person {k + 1} needs "
                             f"{duration:.1f} s to walk through {len(path)} camera(s)")
        start = (k + float(rng.uniform(0.0, 1.0))) / config.people * (config.seconds - duration)
        visits += [dataclasses.replace(v, enter_time=v.enter_time + start) for v in planned]
    return visits, transits


def _silhouette(look: Appearance) -> Appearance:
    """The same person drawn in pure white, to find their pixels on a black mask."""
    white = (255.0, 255.0, 255.0)
    return dataclasses.replace(look, skin=white, hair=white, shirt=white, stripes=None,
                               sleeves=white, trousers=white, shoes=white)


def _render_camera(config: SceneConfig, camera_index: int, visits: list[Visit],
                   looks: list[Appearance], rng: np.random.Generator) -> CameraTruth:
    camera = make_camera(SyntheticConfig(num_ids=2 * config.family_size,
                                         family_size=config.family_size, height=HEIGHT,
                                         width=WIDTH), camera_index, rng)
    front = camera.facing_front
    pad = WIDTH // 2  # the mask is wider than the frame: the full box of a person at the edge
    frames, rows = [], []
    for f in range(config.num_frames):
        t = f / FPS
        present = [v for v in visits if v.enter_time <= t <= v.exit_time]
        canvas = camera.background.copy()
        for v in sorted(present, key=lambda v: v.foot_y):  # far (higher) people first
            look = looks[v.person - 1]
            kp = skeleton(v.height, v.centre_x(t), v.foot_y,
                          v.phase + 2 * np.pi * (t - v.enter_time) * FPS / v.period, look, front)
            draw_person(canvas, kp, v.height, look, front)
            mask = np.zeros((HEIGHT, WIDTH + 2 * pad, 3), np.float32)
            shifted = kp.copy()
            shifted[:, 0] += pad
            draw_person(mask, shifted, v.height, _silhouette(look), front)
            ys, xs = np.nonzero(mask[..., 0])
            if len(xs) == 0:
                continue
            x0, x1 = xs.min() - pad, xs.max() + 1 - pad
            y0, y1 = ys.min(), ys.max() + 1
            cx0, cx1 = max(x0, 0), min(x1, WIDTH)
            if cx1 - cx0 >= 0.5 * (x1 - x0):
                rows.append((f, v.person, float(cx0), float(y0), float(cx1 - cx0),
                             float(y1 - y0)))
        if camera.blur:
            canvas = cv2.GaussianBlur(canvas, (3, 3), 0)
        noise = rng.standard_normal(canvas.shape, dtype=np.float32) * camera.noise
        frames.append(np.clip(canvas * camera.gain + noise, 0, 255).astype(np.uint8))
    rows.sort(key=lambda r: (r[0], r[1]))
    return CameraTruth(frames, rows)


def camera_ids(config: SceneConfig) -> list[str]:
    return [f"cam{c}" for c in range(config.cameras)]


def write_truth(path: Path, rows: list[tuple[int, int, float, float, float, float]]) -> Path:
    """Truth rows (0-based frame, person, x, y, w, h) as MOTChallenge text (1-based frames)."""
    path.write_text("".join(f"{f + 1},{pid},{x:.1f},{y:.1f},{w:.1f},{h:.1f},1,-1,-1,-1\n"
                            for f, pid, x, y, w, h in rows))
    return path


def _cams_yaml(config: SceneConfig) -> str:
    cameras = "".join(f"  - {{id: {cam}, source: {cam}.mp4, max_fps: null}}\n"
                      for cam in camera_ids(config))
    return textwrap.dedent(f"""\
        # Synthetic scene (training.scene, seed {config.seed}): {config.people} people,
        # {config.cameras} cameras, {config.seconds:g} s at {FPS} fps. Truth: <camera>.txt.
        #   keyreid-watch --cameras cams.yaml
        #   python -m app.evaluate --db sqlite:///scene.db --truth .
        # (paths are relative to this file's folder)
        database: sqlite:///scene.db
        detector: {{imgsz: 640}}   # people are 90-180 px tall in 640x360: native size is enough
        keypoints: {{backend: yolo-pose}}
        # max_fps null: every frame. At the default 5 fps a person crossing the view moves about
        # half a box width per processed frame; ByteTrack then never confirms most new tracks
        # (an unconfirmed track needs 1 - IoU x score < 0.7 with its next detection).
        cameras:
        """) + cameras


def generate_scene(out: str | Path, config: SceneConfig = SceneConfig()) -> dict:
    """Render the scene into `out` (videos, truth, scene.json, cams.yaml); returns scene.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    looks = [look for look, _ in make_identities(
        SyntheticConfig(num_ids=config.people, family_size=config.family_size), rng)]
    visits, transits = _plan(config, rng)
    ids = camera_ids(config)
    cameras, seen = [], {}
    for c, cam in enumerate(ids):
        truth = _render_camera(config, c, [v for v in visits if v.camera == c], looks, rng)
        write_video(out / f"{cam}.mp4", truth.frames, fps=FPS, codec=CODEC)
        write_truth(out / f"{cam}.txt", truth.rows)
        cameras.append({"id": cam, "video": f"{cam}.mp4", "truth": f"{cam}.txt",
                        "frames": config.num_frames, "facing_front": c % 2 == 0})
        for f, pid, *_ in truth.rows:
            first, last = seen.get((pid, cam), (f, f))
            seen[(pid, cam)] = (min(first, f), max(last, f))
        del truth
    people = []
    for pid in range(1, config.people + 1):
        mine = sorted((v for v in visits if v.person == pid), key=lambda v: v.enter_time)
        people.append({"id": pid, "visits": [
            {"camera": ids[v.camera], "first_frame": seen[(pid, ids[v.camera])][0],
             "last_frame": seen[(pid, ids[v.camera])][1], "enter_time": round(v.enter_time, 3),
             "exit_time": round(v.exit_time, 3)}
            for v in mine if (pid, ids[v.camera]) in seen]})
    scene = {"config": dataclasses.asdict(config), "fps": FPS, "size": [WIDTH, HEIGHT],
             "cameras": cameras,
             "transit_seconds": {f"{ids[c]}-{ids[c + 1]}": round(s, 3)
                                 for c, s in enumerate(transits)},
             "people": people}
    (out / "scene.json").write_text(json.dumps(scene, indent=2))
    (out / "cams.yaml").write_text(_cams_yaml(config))
    return scene


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.scene", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--people", type=int, default=SceneConfig.people)
    parser.add_argument("--seconds", type=float, default=SceneConfig.seconds)
    parser.add_argument("--cameras", type=int, default=SceneConfig.cameras)
    parser.add_argument("--seed", type=int, default=SceneConfig.seed)
    parser.add_argument("--family-size", type=int, default=SceneConfig.family_size,
                        help="people per family (sharing all but one garment)")
    args = parser.parse_args(argv)
    try:
        config = SceneConfig(people=args.people, seconds=args.seconds, cameras=args.cameras,
                             seed=args.seed, family_size=args.family_size)
        scene = generate_scene(args.out, config)
    except ValueError as exc:
        parser.error(str(exc))
    visits = sum(len(p["visits"]) for p in scene["people"])
    print(f"{args.out}: {config.people} people, {visits} camera visits, "
          f"{config.cameras} cameras x {config.num_frames} frames; transit "
          f"{scene['transit_seconds']}; run: keyreid-watch --cameras {args.out / 'cams.yaml'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
