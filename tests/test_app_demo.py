"""The demo on the real pedestrian video (vtest.avi, two half-frame cameras), through the CLI,
limited to its first seconds; skipped only when the video cannot be fetched."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.watcher.config import load_config
from app.watcher.demo import FetchError, fetch_demo
from storage import open_repository

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cams.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def demo_assets():
    """The cached demo (fetched once: cache, Debian's opencv-doc; no web downloads in tests)."""
    try:
        return fetch_demo(online=False)
    except FetchError as exc:
        pytest.skip(f"demo video or weights unavailable: {exc}")


def test_example_config_is_valid_and_reads_the_cache(demo_assets):
    config = load_config(EXAMPLE)
    assert [c.id for c in config.cameras] == ["left", "right"]
    assert all(Path(c.source) == demo_assets.video for c in config.cameras)
    assert config.cameras[0].crop == (0, 0, 384, 576) and config.cameras[1].crop == (384, 0, 384, 576)
    assert not config.warnings


def test_demo_video_end_to_end(demo_assets, tmp_path):
    db = tmp_path / "demo.db"
    result = subprocess.run(
        [sys.executable, "-m", "app.watcher.watch", "--cameras", str(EXAMPLE), "--db", f"sqlite:///{db}",
         "--max-frames", "60"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open_repository(f"sqlite:///{db}", readonly=True) as repo:
        tracklets = repo.list_tracklets(thumbnails=True)
        assert {t.camera_id for t in tracklets} == {"left", "right"}
        dims = set()
        for tracklet in tracklets:
            assert tracklet.thumbnail and tracklet.first_frame <= tracklet.last_frame < 60
            for clip in repo.tracklet_clips(tracklet.id):
                frames = clip.frame_indices
                assert tracklet.first_frame <= frames[0] and frames[-1] <= tracklet.last_frame
                assert all(a <= b for a, b in zip(frames, frames[1:]))
                dims.add(clip.descriptor_dim)
                assert np.isfinite(clip.descriptor).all()
        from reid import Encoder
        assert dims == {Encoder().dim}  # the example's encoder: untrained ViT-Tiny
        clips = repo.stats().clips
        assert clips >= 4, clips
        assert {c.status for c in repo.list_cameras()} == {"finished"}
