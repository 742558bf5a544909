"""cams.yaml validation: every problem reported with its camera and field; exit code 2, nothing started."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from app.watcher.config import ConfigError, load_config
from app.watcher.watch import EXIT_CONFIG, main

GOOD_CAMERAS = """
cameras:
  - {id: left, source: video.mkv, crop: [0, 0, 32, 48]}
  - {id: right, source: video.mkv, crop: [32, 0, 32, 48]}
"""


def _write(folder: Path, text: str) -> Path:
    path = folder / "cams.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _problems(folder: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(_write(folder, text), check_weights=False)
    return info.value.problems


def test_valid_file_resolves_paths_relative_to_the_config_and_expands_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYREID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CAM_HOST", "10.0.0.7")
    config = load_config(_write(tmp_path, """
        database: sqlite:///watch.db
        cameras:
          - {id: a, source: "${KEYREID_CACHE}/vtest.avi", crop: [0, 0, 384, 576], max_fps: 5}
          - {id: b, source: "rtsp://${CAM_HOST}/stream", name: door}
          - {id: c, source: "${UNSET_VARIABLE:-clip.mp4}", enabled: false}
        reid: {batch_size: 8, overrides: {depth: 2}}
        linking: {target_false_link: 0.02, time_window: null}
    """), check_weights=False)
    assert [c.id for c in config.cameras] == ["a", "b", "c"]
    assert [c.id for c in config.enabled_cameras] == ["a", "b"]
    assert config.cameras[0].source == str(tmp_path / "cache" / "vtest.avi")
    assert config.cameras[0].crop == (0, 0, 384, 576) and config.cameras[0].is_file
    assert config.cameras[1].source == "rtsp://10.0.0.7/stream" and not config.cameras[1].is_file
    assert config.cameras[2].source == str(tmp_path / "clip.mp4")
    assert config.database == f"sqlite:///{tmp_path / 'watch.db'}"
    assert config.reid.batch_size == 8 and config.reid.overrides == {"depth": 2}
    assert config.linking.time_window is None and config.linking.target_false_link == 0.02
    # the missing file source is a warning (that camera fails alone at run time), not an error
    assert any("vtest.avi does not exist" in w for w in config.warnings)


@pytest.mark.parametrize("text, expected", [
    ("cameras:\n  - {id: a, source: v.mkv, colour: red}\n",
     "cameras: camera 'a': unknown field 'colour'"),
    ("cameras:\n  - {id: a}\n", "cameras: camera 'a': missing source"),
    ("cameras:\n  - {id: a, source: v.mkv}\n  - {id: a, source: w.mkv}\n",
     "cameras: camera 'a': duplicate camera id (also camera #1)"),
    ("cameras:\n  - {id: a, source: v.mkv, crop: [0, 0, -5, 10]}\n",
     "cameras: camera 'a': crop [x, y, w, h] needs x, y >= 0 and w, h > 0"),
    ("cameras:\n  - {id: a, source: v.mkv, crop: [0, 0, 10]}\n",
     "cameras: camera 'a': crop must be [x, y, w, h] integers"),
    ("database: 'nosuchdialect://x/y'\n" + GOOD_CAMERAS,
     "database: database URL 'nosuchdialect://x/y': unknown database dialect"),
    ("database: 'sqlite:///no/such/folder/x.db'\n" + GOOD_CAMERAS,
     "database: database URL"),
    ("detector: {imgsz: big}\n" + GOOD_CAMERAS, "detector: imgsz must be an integer"),
    ("detector: {tracker: sort}\n" + GOOD_CAMERAS, "detector: tracker must be one of"),
    ("detector: {precision: int4}\n" + GOOD_CAMERAS, "detector: precision must be one of"),
    ("detector: {service: gpu}\n" + GOOD_CAMERAS, "detector: service must be one of"),
    ("detector: {batch_size: 0}\n" + GOOD_CAMERAS, "detector: batch_size must be"),
    ("keypoints: {backend: openpose}\n" + GOOD_CAMERAS, "keypoints: backend must be one of"),
    ("clips: {window: 8, overlap: 8}\n" + GOOD_CAMERAS, "clips: overlap (8) must be < window (8)"),
    ("linking: {threshold: 0.6}\n" + GOOD_CAMERAS, "linking: threshold is gone"),
    ("linking: {target_false_link: 0.7}\n" + GOOD_CAMERAS,
     "linking: target_false_link must be <= 0.49"),
    ("queues: {policy: never}\n" + GOOD_CAMERAS, "queues: policy must be one of"),
    ("reid: {model: keyreid_vit_huge}\n" + GOOD_CAMERAS, "reid: unknown model 'keyreid_vit_huge'"),
    ("reid: {checkpoint: missing.pt}\n" + GOOD_CAMERAS, "reid: checkpoint"),
    ("database: 'postgresql+psycopg://u@127.0.0.1/site'\nretention: {max_gb: 5}\n"
     + GOOD_CAMERAS, "retention.max_gb: a size budget is measured on SQLite files only"),
    ("database: 'postgresql+psycopg://u@127.0.0.1/'\n" + GOOD_CAMERAS,
     "database: database URL 'postgresql+psycopg://u@127.0.0.1/': name the database"),
    ("cameras: []\n", "cameras: give a non-empty list"),
    ("camera:\n  - {id: a, source: v.mkv}\n", "unknown top-level field 'camera'"),
])
def test_each_problem_has_one_clear_message(tmp_path, text, expected):
    problems = _problems(tmp_path, text)
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_of_the_file_is_reported_together(tmp_path):
    problems = _problems(tmp_path, """
        database: 'sqlite://'
        cameras:
          - {id: a, source: v.mkv, fps: 5}
          - {id: a, source: w.mkv}
          - {id: b, crop: [0, 0, 0, 10]}
    """)
    assert len(problems) == 5, problems
    assert any("camera 'a': unknown field 'fps'" in p for p in problems)
    assert any("duplicate camera id" in p for p in problems)
    assert any("camera 'b': missing source" in p for p in problems)
    assert any("camera 'b': crop" in p for p in problems)
    assert any(p.startswith("database:") and "in-memory" in p for p in problems)


def test_unset_variable_and_bad_yaml_are_reported(tmp_path):
    assert "KEYREID_NOT_SET_ANYWHERE" in _problems(
        tmp_path, "cameras:\n  - {id: a, source: '${KEYREID_NOT_SET_ANYWHERE}/v.mkv'}\n")[0]
    assert _problems(tmp_path, "cameras: [\n")[0].startswith("not valid YAML")


def test_missing_weights_are_a_config_error(tmp_path):
    path = _write(tmp_path, "detector: {weights: nowhere.pt}\n" + GOOD_CAMERAS)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any("detector: weights:" in p and "nowhere.pt" in p for p in info.value.problems)


def test_cli_exits_2_and_starts_nothing(tmp_path, capsys):
    path = _write(tmp_path, "database: sqlite:///w.db\n"
                            "cameras:\n  - {id: a, source: v.mkv, crop: [0, 0, -1, 4]}\n")
    assert main(["--cameras", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "camera 'a': crop" in err and "nothing was started" in err
    assert not (tmp_path / "w.db").exists()
    assert main(["--cameras", str(tmp_path / "absent.yaml")]) == EXIT_CONFIG


def test_backend_problems_exit_2_and_start_nothing(tmp_path, capsys):
    path = _write(tmp_path, "database: sqlite:///w.db\ndetector: {service: shared}\n" + GOOD_CAMERAS)
    assert main(["--cameras", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "service shared needs --backend ray" in err and "nothing was started" in err
    assert not (tmp_path / "w.db").exists()
    assert main(["--cameras", str(path), "--ray-address", "127.0.0.1:1"]) == EXIT_CONFIG
    assert "--ray-address needs --backend ray" in capsys.readouterr().err
    path.write_text(path.read_text().replace("service: shared", "service: auto"))
    assert main(["--cameras", str(path), "--backend", "ray", "--ray-address", "127.0.0.1:1"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "no Ray cluster at 127.0.0.1:1" in err and "nothing was started" in err
    assert "ray" not in sys.modules  # refused before Ray was imported (and its threads started)
