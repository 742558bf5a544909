"""Soak benchmark: the two-camera demo looped for a long real-time run, measured from outside.

    python -m app.soak --minutes 30 [--out DIR] [--video PATH]

It writes the demo video looped end to end (PyAV remux, no re-encode) long enough for the run,
starts `keyreid-watch --realtime --duration` on its two halves (the README demo's settings),
and samples every `--every` seconds the resident memory of the main process and of each camera
worker (from /proc) and the database's bytes on disk. At the end it prints RSS at start (after
the warm-up) and at the end per process, database bytes per camera-hour, and the watcher's last
status line and summary. A benchmark, not a test: it prints numbers and asserts nothing.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import av

from .watcher.config import default_cache_dir
from .watcher.demo import VIDEO_NAME

ROOT = Path(__file__).resolve().parent.parent
CAMERAS = """\
database: sqlite:///{db}
cameras:
  - {{id: left, source: {video}, crop: [0, 0, 384, 576], max_fps: 5}}
  - {{id: right, source: {video}, crop: [384, 0, 384, 576], max_fps: 5}}
keypoints: {{backend: yolo-pose}}
"""


def loop_video(source: Path, target: Path, seconds: float) -> Path:
    """`source` repeated until it lasts `seconds`, packets copied with shifted timestamps."""
    with av.open(str(source)) as probe:
        stream = probe.streams.video[0]
        length = float(stream.duration * stream.time_base) if stream.duration else \
            float(probe.duration / 1e6)
    loops = max(1, int(seconds / length) + 1)
    with av.open(str(target), "w") as out:
        with av.open(str(source)) as first:
            template = first.streams.video[0]
            video = out.add_stream_from_template(template)
        offset = 0
        for _ in range(loops):
            with av.open(str(source)) as container:
                stream = container.streams.video[0]
                last = 0
                for packet in container.demux(stream):
                    if packet.pts is None:
                        continue
                    step = int(1 / (stream.average_rate or 10) / stream.time_base)
                    packet.pts += offset
                    packet.dts = packet.pts
                    last = max(last, packet.pts + step)
                    packet.stream = video
                    out.mux(packet)
                offset = last
    return target


@dataclass
class Sample:
    elapsed: float
    rss_kib: dict[str, int]
    db_bytes: int


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _processes(main_pid: int) -> dict[str, int]:
    """The watcher and its camera workers (by their process titles), pid per role."""
    found = {"main": main_pid}
    try:
        children = Path(f"/proc/{main_pid}/task/{main_pid}/children").read_text().split()
    except OSError:
        return found
    for pid in map(int, children):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "resource_tracker" in command:
            continue
        found[f"worker {pid}"] = pid
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path("soak"))
    parser.add_argument("--video", type=Path, default=default_cache_dir() / VIDEO_NAME)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--warm-up", type=float, default=60.0,
                        help="seconds after start whose RSS counts as 'start'")
    args = parser.parse_args(argv)
    if not args.video.is_file():
        print(f"no demo video at {args.video}: run keyreid-fetch-demo first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = args.minutes * 60
    looped = loop_video(args.video, args.out / "looped.mkv", seconds + 60)
    db = args.out / "soak.db"
    for stale in args.out.glob("soak.db*"):
        stale.unlink()
    config = args.out / "cams.yaml"
    config.write_text(CAMERAS.format(db=db.resolve(), video=looped.resolve()))
    log = args.out / "watch.log"
    print(f"soak: {args.minutes:g} min of the looped demo ({looped}), log {log}", flush=True)
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "app.watcher.watch", "--cameras", str(config),
                                    "--realtime", "--duration", str(seconds)], cwd=ROOT,
                                   stdout=out, stderr=subprocess.STDOUT)
    started = time.monotonic()
    samples: list[Sample] = []
    roles: dict[str, int] = {}
    while process.poll() is None:
        time.sleep(args.every)
        roles.update(_processes(process.pid))
        rss = {role: kib for role, pid in roles.items() if (kib := _rss_kib(pid)) is not None}
        size = sum(p.stat().st_size for p in args.out.glob("soak.db*") if p.suffix != ".lock")
        samples.append(Sample(time.monotonic() - started, rss, size))
        print(f"  {samples[-1].elapsed:7.0f} s  db {size / 1e6:8.2f} MB  " + "  ".join(
            f"{role} {kib / 1024:.0f} MiB" for role, kib in sorted(rss.items())), flush=True)
    text = log.read_text()
    status = [line for line in text.splitlines() if " | encoder: " in line]
    summary = text[text.rfind("run "):] if "run " in text else ""
    running = [s for s in samples if s.elapsed <= seconds]  # not the shutdown
    first = next((s for s in running if s.elapsed >= args.warm_up), running[0] if running else None)
    print(f"\nexit code {process.returncode}; wall {time.monotonic() - started:.0f} s")
    if first is not None:
        last = running[-1]
        print(f"| process | RSS at {first.elapsed:.0f} s (MiB) | RSS at {last.elapsed:.0f} s "
              f"(MiB) |\n|---|---:|---:|")
        for role in sorted(first.rss_kib):
            end = last.rss_kib.get(role)
            print(f"| {role} | {first.rss_kib[role] / 1024:.0f} | "
                  f"{'exited' if end is None else f'{end / 1024:.0f}'} |")
    video = [float(m) for m in re.findall(r"frames, ([\d.]+) s of video", text)]
    size = max((s.db_bytes for s in samples), default=0)
    if video and sum(video) > 0:
        print(f"database: {size / 1e6:.1f} MB for {sum(video) / 3600:.3f} camera-hours of "
              f"video processed: {size / 1e6 / (sum(video) / 3600):.1f} MB per camera-hour")
    if status:
        print("last status line:", status[-1].split(": ", 2)[-1])
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
