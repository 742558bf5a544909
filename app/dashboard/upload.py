"""Search by upload: photos or a short video of a person -> one query clip -> one descriptor.

The query clip is cut exactly like the watcher's clips: YOLO-pose finds the person and their
17 keypoints, `tracking.TrackletBuffer` crops (same margin, 256x128 resize, keypoints mapped
into the crop) and samples T frames (repeating frames when there are fewer), and the same
`reid.Encoder` as the watcher turns it into a descriptor. Uploads are untrusted: sizes are
checked before decoding, work is capped while decoding (frames and pixels, of images with many
frames too), videos are demuxed from memory by an allow-list of containers that can never open
another file, and every refusal is a `UploadError` naming the file.
"""
from __future__ import annotations

import io
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn, Protocol, Sequence

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tracking import Clip, Detection, VideoFrame
from tracking.tracklets import TrackletBuffer

from .data import DashboardError

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})
MAX_IMAGE_PIXELS = 40_000_000  # per image or video frame; bigger is refused before decoding
# An image file may hold several frames (a photo with its MPO depth map or HDR gain map, an
# animated GIF, a multi-page TIFF): only the first is used, but counting them means seeking,
# and a GIF decodes each frame it seeks past. More frames, or more pixels over all of them,
# than these is refused as an animation (or a bomb), not a photo.
MAX_IMAGE_FRAMES = 100
MAX_IMAGE_TOTAL_PIXELS = 2 * MAX_IMAGE_PIXELS
MAX_VIDEO_FRAMES = 100  # frames kept from an uploaded video (after the fps limit)
VIDEO_MAX_FPS = 5.0  # frames per second of video time kept: a short clip spans 20 s
# Decoding work per video, whatever its frame rate or timestamps: 20 s of 60 fps, or 1.5
# gigapixels (~25 s of 1080p30); decoding stops there and the frames kept so far are used.
MAX_VIDEO_DECODED_FRAMES = 1_200
MAX_VIDEO_DECODED_PIXELS = 1_500_000_000
# FFmpeg demuxers for the containers VIDEO_SUFFIXES name (MP4/MOV, Matroska/WebM, AVI, MPEG
# program and elementary streams). None of them reads another file (MOV external references,
# "drefs", are off by default); playlists (HLS, DASH), concat scripts, image sequences and SDP
# files are not on the list, so FFmpeg refuses them before their header is read.
VIDEO_DEMUXERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "mpeg", "mpegvideo")
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


def _check_frames(image: Image.Image, name: str, max_frames: int, max_total_pixels: int) -> None:
    """Refuse an image file with more than `max_frames` frames or `max_total_pixels` over its
    frames; each frame's size is read before seeking past it decodes it (GIF). Ends on frame 0."""
    frames = total = 0
    while True:
        width, height = image.size
        frames += 1
        total += width * height
        if frames > max_frames:
            raise UploadError(f"{name}: more than {max_frames} frames in one image (an "
                              "animation?); upload photos, or a short video")
        if total > max_total_pixels:
            raise UploadError(f"{name}: its {frames} frames hold more than "
                              f"{max_total_pixels / 1e6:.3g} megapixels (refused before "
                              "decoding them: it may be a decompression bomb)")
        try:
            image.seek(frames)
        except EOFError:
            break
    image.seek(0)


def load_image(file: UploadedFile, max_pixels: int = MAX_IMAGE_PIXELS, *,
               max_frames: int = MAX_IMAGE_FRAMES,
               max_total_pixels: int = MAX_IMAGE_TOTAL_PIXELS) -> np.ndarray:
    """Decode an uploaded image (its first frame) to RGB uint8, refusing non-images and
    decompression bombs.

    The pixel count is read from the header before any decoding, so a small file that would
    expand to gigabytes is refused without allocating it; files of many frames are capped in
    frames and total pixels (`_check_frames`); PIL's own bomb checks are errors too.
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
                _check_frames(image, file.name, max_frames, max_total_pixels)
                image = ImageOps.exif_transpose(image)
                return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise UploadError(f"{file.name}: not an image (PIL cannot identify it); upload JPEG, "
                          "PNG, WebP or BMP photos, or a short video") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(f"{file.name}: refused as a possible decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise UploadError(f"{file.name}: the image could not be decoded ({exc})") from None


@dataclass(frozen=True)
class DecodedVideo:
    """The frames kept from an uploaded video, how many were decoded, and what to tell the user."""

    frames: list[VideoFrame]
    frames_decoded: int
    notes: tuple[str, ...]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, av.FFmpegError):
        return exc.strerror or str(exc)
    return str(exc)


def _decoder_pixels(max_pixels: int) -> str:
    """FFmpeg's own `max_pixels` for decoders: a backstop against allocating a huge frame,
    with headroom for the padding decoders add (the exact limit is checked on each frame)."""
    return str(int(max_pixels * 1.5) + 2**20)


def _open_video(file: UploadedFile, max_pixels: int) -> av.container.InputContainer:
    """Demux the upload from memory with only VIDEO_DEMUXERS allowed and no I/O protocol at all.

    No file name reaches FFmpeg, so nothing is chosen by extension (image sequences, HLS);
    the format allow-list refuses playlists and scripts before their header is read; and the
    protocol allow-list "none" (copied by FFmpeg to every nested open: concat children, HLS
    segments, MOV references) means nothing but the uploaded bytes can ever be read.
    `max_pixels` also binds the decoders FFmpeg runs while probing the streams.
    """
    try:
        return av.open(io.BytesIO(file.data),
                       container_options={"format_whitelist": ",".join(VIDEO_DEMUXERS),
                                          "protocol_whitelist": "none"},
                       options={"max_pixels": _decoder_pixels(max_pixels)})
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise UploadError(f"{file.name}: not a video in an accepted container (MP4/MOV, "
                          f"Matroska/WebM, AVI or MPEG; no playlists or scripts): "
                          f"{_describe(exc)}") from None


def load_video(file: UploadedFile, max_pixels: int = MAX_IMAGE_PIXELS, *,
               max_frames: int = MAX_VIDEO_FRAMES, max_fps: float = VIDEO_MAX_FPS,
               max_decoded_frames: int = MAX_VIDEO_DECODED_FRAMES,
               max_decoded_pixels: int = MAX_VIDEO_DECODED_PIXELS) -> DecodedVideo:
    """Up to `max_frames` frames (at most `max_fps` per second of video time) of an upload.

    The caps hold while decoding: a frame over `max_pixels` is refused from the stream header
    (and by the decoder itself if the size changes mid-stream), and decoding stops after
    `max_decoded_frames` frames or `max_decoded_pixels` pixels (or twice as many packets),
    however few of them the fps limit kept.
    """
    def refuse(reason: str) -> NoReturn:
        raise UploadError(f"{file.name}: {reason}")

    container = _open_video(file, max_pixels)
    with container:
        if container.format.name not in VIDEO_DEMUXERS:  # the whitelist already ensures it
            refuse(f"{container.format.name} is not an accepted video container")
        if not container.streams.video:
            refuse("no video stream (not a video?)")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            refuse(f"{width}x{height} frames are larger than the {max_pixels / 1e6:.3g} "
                   "megapixel limit (refused before decoding)")
        stream.codec_context.options = {"max_pixels": _decoder_pixels(max_pixels)}
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 25.0
        period = 1.0 / max_fps
        frames: list[VideoFrame] = []
        decoded = pixels = packets = 0
        next_time: float | None = None

        def over_work() -> bool:
            return (decoded >= max_decoded_frames or pixels >= max_decoded_pixels
                    or packets >= 2 * max_decoded_frames)

        try:
            for packet in container.demux(stream):
                packets += 1
                try:
                    decoded_frames = packet.decode()
                except av.InvalidDataError:
                    decoded_frames = []  # a corrupt packet: skipped, as the watcher does
                for frame in decoded_frames:
                    if frame.width * frame.height > max_pixels:
                        refuse(f"{frame.width}x{frame.height} frames are larger than the "
                               f"{max_pixels / 1e6:.3g} megapixel limit")
                    stamp = float(frame.time) if frame.time is not None else decoded / fps
                    decoded += 1
                    pixels += frame.width * frame.height
                    # The watcher's fps sampling: a grid of `period`, restarted after a gap,
                    # with a small tolerance (every 6th frame of 30 fps at 5 fps).
                    if next_time is None or stamp >= next_time - 1e-3 * period:
                        frames.append(VideoFrame(index=decoded - 1, time=stamp,
                                                 image=frame.to_ndarray(format="rgb24")))
                        next_time = (stamp if next_time is None else next_time) + period
                        if next_time <= stamp:
                            next_time = stamp + period
                    if len(frames) >= max_frames or over_work():
                        break
                if len(frames) >= max_frames or over_work():
                    break
        except av.FFmpegError as exc:
            refuse(f"the video could not be decoded with frames of at most "
                   f"{max_pixels / 1e6:.3g} megapixels ({_describe(exc)})")
    if not frames:
        refuse("the video has no frames")
    notes: tuple[str, ...] = ()
    if len(frames) < max_frames and over_work():
        span = frames[-1].time - frames[0].time
        notes = ((f"{file.name}: only the first {span:.1f} s were used: uploads are decoded up "
                  f"to {max_decoded_frames} frames or {max_decoded_pixels / 1e9:.1f} gigapixels"),)
    return DecodedVideo(frames, decoded, notes)


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
        video = load_video(videos[0], max_pixels)
        query = clip_from_video(videos[0].name, video.frames, tracker, policy)
        return replace(query, notes=video.notes + query.notes)
    images = [(f.name, load_image(f, max_pixels)) for f in files]
    return clip_from_images(images, tracker, policy)

