"""`python -m app.bench` on the first frames of the demo: one column per detector runtime."""
from __future__ import annotations

import pytest

from app.bench import run_bench
from app.watcher.demo import FetchError, fetch_demo

pytestmark = pytest.mark.slow


def test_bench_compares_runtimes_side_by_side():
    try:
        fetch_demo(online=False)
    except FetchError as exc:
        pytest.skip(f"demo video or weights unavailable: {exc}")
    report = run_bench(max_frames=6, runtimes=["torch", "auto"], reid_runtime="torch")
    lines = report.splitlines()
    header = next(line for line in lines if line.startswith("| ms per processed frame"))
    runtimes = [cell.strip() for cell in header.strip("|").split("|")[1:]]
    assert runtimes[0] == "torch" and len(runtimes) == 2
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in lines if line.startswith("| ")}
    assert float(rows["detect_track"][0]) > 0 and float(rows["detect_track"][1]) > 0
    assert rows["processed frames (all cameras)"] == ["6", "6"]  # 3 per camera at 5 of 10 fps
    assert all(float(v) >= 0 for v in rows["people per frame (detection-only run)"])
    assert all(float(v) > 0 for v in rows["detection + tracking alone: CPU ms per frame (all threads)"])
    assert "load average" in report and "limiting stage with torch: detect_track" in report
