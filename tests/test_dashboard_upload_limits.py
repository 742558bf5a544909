"""Uploads are untrusted: caps hold while decoding, and no upload makes FFmpeg open a file.

Every file here is real (encoded with PyAV / Pillow); "never opened" is watched with inotify.
"""
from __future__ import annotations

import ctypes
import io
import os
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import GifImagePlugin, Image

from app.dashboard import upload as dashboard_upload
from app.dashboard.upload import (
    ClipPolicy,
    UploadedFile,
    UploadError,
    build_query_clip,
    load_image,
    load_video,
)
from tracking import Detection


def encode_video(path: Path, frames: int, *, fps: int = 10, size: tuple[int, int] = (64, 48),
                 fmt: str | None = None) -> bytes:
    """A real MPEG-4 video of `frames` frames, each a different grey (nothing is duplicated)."""
    width, height = size
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), (i * 7) % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path.read_bytes()


class OpenWatch:
    """Whether anyone opened a file since the watch began (Linux inotify, IN_OPEN)."""

    IN_OPEN = 0x20

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_OPEN) < 0:
            pytest.skip(f"inotify unavailable (errno {ctypes.get_errno()})")

    def opened(self) -> bool:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return False
        _, mask, _, _ = struct.unpack_from("iIII", data)  # the first inotify_event
        return bool(mask & self.IN_OPEN)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def target(tmp_path) -> Path:
    """A local video a hostile upload would like FFmpeg to read."""
    path = tmp_path / "target.mp4"
    encode_video(path, 10)
    return path


def test_a_video_is_sampled_at_the_fps_limit(tmp_path):
    data = encode_video(tmp_path / "v.mp4", 30, fps=10)
    video = load_video(UploadedFile("walk.mp4", data))
    assert video.frames_decoded == 30
    assert [f.index for f in video.frames] == list(range(0, 30, 2))  # 5 of every 10 fps
    assert video.frames[0].image.shape == (48, 64, 3) and not video.notes


@pytest.mark.parametrize("suffix, fmt", [(".mkv", "matroska"), (".avi", "avi")])
def test_other_named_containers_are_accepted(tmp_path, suffix, fmt):
    data = encode_video(tmp_path / f"v{suffix}", 10, fmt=fmt)
    assert load_video(UploadedFile(f"walk{suffix}", data)).frames_decoded == 10


def test_decoding_stops_at_the_frame_cap_however_few_frames_are_kept(tmp_path):
    # 400 frames at 200 fps: the 5 fps limit keeps one frame in 40, so the kept-frame cap
    # would never stop this; the decoded-frame cap must.
    data = encode_video(tmp_path / "fast.mp4", 400, fps=200)
    video = load_video(UploadedFile("fast.mp4", data), max_decoded_frames=60)
    assert video.frames_decoded == 60
    assert [f.index for f in video.frames] == [0, 40]
    assert video.notes and "fast.mp4" in video.notes[0] and "60 frames" in video.notes[0]


def test_decoding_stops_at_the_pixel_cap(tmp_path):
    data = encode_video(tmp_path / "v.mp4", 100, size=(64, 48))
    video = load_video(UploadedFile("v.mp4", data), max_decoded_pixels=64 * 48 * 25)
    assert video.frames_decoded == 25


def test_frames_over_the_pixel_limit_are_refused(tmp_path):
    data = encode_video(tmp_path / "v.mp4", 10, size=(64, 48))
    with pytest.raises(UploadError, match=r"big\.mp4: .*0\.003 megapixel"):
        load_video(UploadedFile("big.mp4", data), max_pixels=3000)
    assert load_video(UploadedFile("ok.mp4", data), max_pixels=64 * 48).frames_decoded == 10


def growing_mjpeg(big: tuple[int, int]) -> bytes:
    """Matroska MJPEG whose header says 64x48; frames 3.. are `big` (each JPEG has its size)."""
    def jpeg(size: tuple[int, int]) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", size, (200, 10, 10)).save(out, format="JPEG")
        return out.getvalue()

    out = io.BytesIO()
    with av.open(out, "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i, size in enumerate([(64, 48)] * 3 + [big] * 3):
            packet = av.Packet(jpeg(size))
            packet.stream, packet.time_base, packet.pts, packet.dts = stream, Fraction(1, 10), i, i
            container.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize("big, message", [
    ((640, 480), "640x480 frames are larger than the 0.0123 megapixel limit"),  # our check
    ((4000, 3000), "the video could not be decoded with frames of at most 0.0123"),  # FFmpeg
])
def test_frames_growing_mid_stream_are_refused_while_decoding(big, message):
    data = growing_mjpeg(big)
    with pytest.raises(UploadError, match=rf"^grow\.mkv: {message}"):
        load_video(UploadedFile("grow.mkv", data), max_pixels=64 * 48 * 4)
    assert load_video(UploadedFile("grow.mkv", data)).frames_decoded == 6


def test_a_playlist_renamed_mp4_is_refused_and_opens_nothing(tmp_path, target):
    playlist = ("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
                f"#EXTINF:1.0,\n{target}\n#EXT-X-ENDLIST\n")
    (tmp_path / "list.m3u8").write_text(playlist)
    watch = OpenWatch(target)
    try:
        # What is at stake: FFmpeg reads a playlist's segments, any local file it names.
        with av.open(str(tmp_path / "list.m3u8")) as container:
            assert container.format.name == "hls"
        assert watch.opened()
        with pytest.raises(UploadError, match=r"^list\.mp4: "):
            load_video(UploadedFile("list.mp4", playlist.encode()))
        assert not watch.opened(), "the upload made FFmpeg open another file"
    finally:
        watch.close()


CONCAT = b"ffconcat version 1.0\nfile 'target.mp4'\n"


def test_a_concat_script_is_refused_and_opens_nothing(tmp_path, target, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the script names a file relative to the server's folder
    watch = OpenWatch(target)
    try:
        with av.open(io.BytesIO(CONCAT)) as container:  # unprotected, FFmpeg follows it
            assert container.format.name == "concat"
        assert watch.opened()
        with pytest.raises(UploadError, match=r"^clip\.mp4: not a video in an accepted container"):
            load_video(UploadedFile("clip.mp4", CONCAT))
        assert not watch.opened(), "the upload made FFmpeg open another file"
    finally:
        watch.close()


def test_even_an_allowed_demuxer_cannot_open_another_file(tmp_path, target, monkeypatch):
    # The second guard, alone: were concat on the allow-list, no protocol may open its file.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dashboard_upload, "VIDEO_DEMUXERS",
                        dashboard_upload.VIDEO_DEMUXERS + ("concat",))
    watch = OpenWatch(target)
    try:
        with pytest.raises(UploadError, match=r"^clip\.mp4: not a video"):
            load_video(UploadedFile("clip.mp4", CONCAT))
        assert not watch.opened()
    finally:
        watch.close()


def test_an_image_renamed_mp4_is_not_a_video(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (64, 48)).save(png, format="PNG")
    with pytest.raises(UploadError, match=r"photo\.mp4: not a video in an accepted container"):
        load_video(UploadedFile("photo.mp4", png.getvalue()))


def gif(frames: int, size: tuple[int, int] = (16, 16)) -> bytes:
    images = [Image.new("L", size, i % 2 * 255) for i in range(frames)]  # no two alike in a row
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=40)
    return out.getvalue()


def test_an_animated_gif_bomb_is_refused_after_few_frames(monkeypatch):
    data = gif(5000)
    assert len(data) < 500_000
    loads = []
    original = GifImagePlugin.GifImageFile.load
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "load",
                        lambda self: loads.append(1) or original(self))
    with pytest.raises(UploadError, match=r"anim\.gif: more than 100 frames"):
        load_image(UploadedFile("anim.gif", data))
    assert len(loads) <= 101, f"{len(loads)} frames decoded for a refusal"


def test_frames_of_an_image_are_capped_in_total_pixels():
    data = gif(10, (200, 200))
    with pytest.raises(UploadError, match=r"anim\.gif: its 3 frames hold more than 0\.1 megap"):
        load_image(UploadedFile("anim.gif", data), max_total_pixels=100_000)


def test_an_image_with_a_few_frames_gives_its_first():
    first = load_image(UploadedFile("two.gif", gif(2)))
    assert first.shape == (16, 16, 3) and first.max() == 0  # frame 0 is black
    pages = [Image.new("RGB", (32, 24), (i * 80, 0, 0)) for i in range(3)]
    tiff = io.BytesIO()
    pages[0].save(tiff, format="TIFF", save_all=True, append_images=pages[1:])
    assert load_image(UploadedFile("scan.tiff", tiff.getvalue())).shape == (24, 32, 3)
    with pytest.raises(UploadError, match="more than 2 frames"):
        load_image(UploadedFile("scan.tiff", tiff.getvalue()), max_frames=2)


class OnePerson:
    """A tracker that finds the same person in every frame."""

    def update(self, image_rgb: np.ndarray) -> list[Detection]:
        keypoints = np.tile(np.array([[30.0, 20.0, 0.9]], np.float32), (17, 1))
        return [Detection(np.array([10, 5, 50, 45], np.float32), 0.9, 1, keypoints)]

    def reset(self) -> None:
        pass


def test_a_truncated_decode_is_told_to_the_user(tmp_path, monkeypatch):
    load = dashboard_upload.load_video
    monkeypatch.setattr(dashboard_upload, "load_video",
                        lambda file, max_pixels: load(file, max_pixels, max_decoded_frames=30))
    data = encode_video(tmp_path / "long.mp4", 100, fps=10)
    query = build_query_clip([UploadedFile("long.mp4", data)], OnePerson(), ClipPolicy(),
                             max_bytes=10 * 2**20)
    assert len(query.clip.crops) == 4
    assert any("long.mp4: only the first" in note for note in query.notes)
