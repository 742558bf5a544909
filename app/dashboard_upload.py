"""Search by upload: photos or a short video of a person -> one query clip -> one descriptor.

The query clip is cut exactly like the watcher's clips: YOLO-pose finds the person and their
17 keypoints, `tracking.TrackletBuffer` crops (same margin, 256x128 resize, keypoints mapped
into the crop) and samples T frames (repeating frames when there are fewer), and the same
`reid.Encoder` as the watcher turns it into a descriptor. Uploads are untrusted: sizes are
checked before decoding, and every refusal is a `UploadError` naming the file.
"""
from __future__ import annotations

import io
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tracking import Clip, Detection, SourceError, VideoFrame, VideoSource
from tracking.tracklets import TrackletBuffer

from .dashboard_data import DashboardError

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})
MAX_IMAGE_PIXELS = 40_000_000  # per image or video frame; bigger is refused before decoding
MAX_VIDEO_FRAMES = 100  # frames read from an uploaded video (after the fps limit)
VIDEO_MAX_FPS = 5.0  # frames per second of video time kept: a short clip spans 20 s
UPLOAD_TRACK_ID = 0


class UploadError(DashboardError):
    """An uploaded file cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class UploadedFile:
    name: str
    data: bytes


class PersonTracker(Protocol):
    """What the upload path needs of `tracking.PoseTracker`."""

    def update(self, image_rgb: np.ndarray) -> list[Detection]: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class QueryClip:
    """The clip a search by upload encodes, and where its frames came from."""

    clip: Clip
    sources: tuple[str, ...]
    notes: tuple[str, ...]


def check_size(file: UploadedFile, max_bytes: int) -> None:
    if len(file.data) > max_bytes:
        raise UploadError(f"{file.name}: {len(file.data) / 2**20:.1f} MiB is larger than the "
                          f"{max_bytes / 2**20:.0f} MiB upload limit")
    if not file.data:
        raise UploadError(f"{file.name}: the file is empty")


def _pil_open():
    """PIL's own `Image.open`. Importing ultralytics replaces it process-wide with a wrapper
    that, on an unidentified file, tries to install and register `pi-heif`: an uploaded
    non-image must get our message, not a package installation."""
    patches = sys.modules.get("ultralytics.utils.patches")
    if patches is not None and Image.open is getattr(patches, "image_open", None):
        return patches._image_open
    return Image.open


def load_image(file: UploadedFile, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an uploaded image to RGB uint8, refusing non-images and decompression bombs.

    The pixel count is read from the header before any decoding, so a small file that would
    expand to gigabytes is refused without allocating it; PIL's own bomb checks are errors too.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _pil_open()(io.BytesIO(file.data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise UploadError(
                        f"{file.name}: {width}x{height} = {width * height / 1e6:.0f} megapixels is "
                        f"more than the {max_pixels / 1e6:.0f} megapixel limit (refused before "
                        "decoding: it may be a decompression bomb)")
                image = ImageOps.exif_transpose(image)
                return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise UploadError(f"{file.name}: not an image (PIL cannot identify it); upload JPEG, "
                          "PNG, WebP or BMP photos, or a short video") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(f"{file.name}: refused as a possible decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise UploadError(f"{file.name}: the image could not be decoded ({exc})") from None


def load_video(file: UploadedFile, max_pixels: int = MAX_IMAGE_PIXELS) -> list[VideoFrame]:
    """Up to MAX_VIDEO_FRAMES frames (at most VIDEO_MAX_FPS per second) of an uploaded video."""
    suffix = Path(file.name).suffix.lower()
    with tempfile.TemporaryDirectory(prefix="keyreid-upload-") as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(file.data)
        source = VideoSource(path, max_fps=VIDEO_MAX_FPS, name=file.name)
        frames: list[VideoFrame] = []
        try:
            for frame in source:
                height, width = frame.image.shape[:2]
                if width * height > max_pixels:
                    raise UploadError(f"{file.name}: {width}x{height} frames are larger than the "
                                      f"{max_pixels / 1e6:.0f} megapixel limit")
                frames.append(frame)
                if len(frames) >= MAX_VIDEO_FRAMES:
                    source.stop()
                    break
        except SourceError as exc:
            raise UploadError(f"{file.name}: not a readable video ({exc})") from None
    if not frames:
        raise UploadError(f"{file.name}: the video has no frames")
    return frames


def _largest(detections: Sequence[Detection]) -> Detection | None:
    return max(detections, key=lambda d: d.width * d.height, default=None)


@dataclass(frozen=True)
class ClipPolicy:
    """The watcher's clip shape: frames per clip, crop margin and crop size (height, width)."""

    length: int = 4
    crop_margin: float = 0.1
    size: tuple[int, int] = (256, 128)

    def buffer(self, count: int) -> TrackletBuffer:
        # One window over everything uploaded: the clip is sampled across all of it.
        window = max(count, self.length)
        return TrackletBuffer("upload", clip_length=self.length, window=window, overlap=0,
                              lost_after=window + 1, clip_size=self.size,
                              crop_margin=self.crop_margin)


def _first_clip(buffer: TrackletBuffer, ready: list[Clip], track_id: int) -> Clip:
    clips = ready + buffer.flush()
    return next(c for c in clips if c.track_id == track_id)


def clip_from_images(images: Sequence[tuple[str, np.ndarray]], tracker: PersonTracker,
                     policy: ClipPolicy) -> QueryClip:
    """The largest person of each image, as one clip (images in upload order)."""
    found: list[tuple[str, np.ndarray, Detection]] = []
    notes: list[str] = []
    for name, image in images:
        tracker.reset()  # unrelated photos: no motion model between them
        person = _largest(tracker.update(image))
        if person is None:
            notes.append(f"{name}: nobody found in this image; it was left out")
        else:
            found.append((name, image, person))
    if not found:
        raise UploadError("nobody was found in the uploaded image(s): upload photos in which a "
                          "person is clearly visible (whole body preferred)")
    buffer = policy.buffer(len(found))
    ready: list[Clip] = []
    for index, (_, image, person) in enumerate(found):
        detection = Detection(box=person.box, score=person.score, track_id=UPLOAD_TRACK_ID,
                              keypoints=person.keypoints)
        ready += buffer.update(VideoFrame(index=index, time=float(index), image=image), [detection])
    return QueryClip(_first_clip(buffer, ready, UPLOAD_TRACK_ID),
                     tuple(name for name, _, _ in found), tuple(notes))


def clip_from_video(name: str, frames: Sequence[VideoFrame], tracker: PersonTracker,
                    policy: ClipPolicy) -> QueryClip:
    """The person with the largest total box area over the video (tracked), as one clip."""
    tracker.reset()
    buffer = policy.buffer(len(frames))
    area: dict[int, float] = {}
    ready: list[Clip] = []
    for frame in frames:
        detections = tracker.update(frame.image)
        for d in detections:
            area[d.track_id] = area.get(d.track_id, 0.0) + d.width * d.height
        ready += buffer.update(frame, detections)
    if not area:
        raise UploadError(f"{name}: nobody was found in the first {len(frames)} sampled frames")
    chosen = max(area, key=area.__getitem__)
    notes = (f"{name}: {len(area)} people tracked; the one with the largest boxes was used",
             ) if len(area) > 1 else ()
    return QueryClip(_first_clip(buffer, ready, chosen), (name,), notes)


def build_query_clip(files: Sequence[UploadedFile], tracker: PersonTracker, policy: ClipPolicy, *,
                     max_bytes: int, max_pixels: int = MAX_IMAGE_PIXELS) -> QueryClip:
    """One query clip from the uploads: a single video, or one or more images."""
    if not files:
        raise UploadError("no file uploaded")
    for file in files:
        check_size(file, max_bytes)
    videos = [f for f in files if Path(f.name).suffix.lower() in VIDEO_SUFFIXES]
    if videos:
        if len(files) > 1:
            raise UploadError("upload either one video or one or more images, not both "
                              f"(got {', '.join(f.name for f in files)})")
        return clip_from_video(videos[0].name, load_video(videos[0], max_pixels), tracker,
                               policy)
    images = [(f.name, load_image(f, max_pixels)) for f in files]
    return clip_from_images(images, tracker, policy)

