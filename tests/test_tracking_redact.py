"""Credentials in camera URLs are hidden wherever text is logged, stored or shown."""
import pytest

from tracking.redact import redact, redact_value


@pytest.mark.parametrize("text, expected", [
    ("rtsp://admin:S3cr3t!@10.0.0.5:554/stream1", "rtsp://admin:***@10.0.0.5:554/stream1"),
    ("cannot open (Connection refused: rtsp://u:p%40ss@cam/live)", "cannot open (Connection refused: rtsp://u:***@cam/live)"),
    ("http://cam/video.mjpg?user=bob&password=hunter2&fps=5", "http://cam/video.mjpg?user=bob&password=***&fps=5"),
    ("https://x/y?token=abc.def&passwd=zz", "https://x/y?token=***&passwd=***"),
    ("rtsp://cam.local/live?Token=AbC", "rtsp://cam.local/live?Token=***"),
    ("rtsp://viewer@cam/live", "rtsp://viewer@cam/live"),  # a user name alone is no secret
    ("/videos/gate:1@2.mp4", "/videos/gate:1@2.mp4"),  # not a URL
    ("two: rtsp://a:1@h/x and rtmp://b:2@h/y", "two: rtsp://a:***@h/x and rtmp://b:***@h/y"),
    ("rtsp://admin:${CAM_PASSWORD}@cam/live?token=${TOKEN}", "rtsp://admin:${CAM_PASSWORD}@cam/live?token=${TOKEN}"),
    ("rtsp://a:${PW:-hunter2}@cam/live", "rtsp://a:***@cam/live"),
    ("", ""),
])
def test_redact(text, expected):
    assert redact(text) == expected


def test_redact_value_walks_a_config():
    config = {"cameras": [{"id": "gate", "source": "rtsp://a:pw@h/s"}], "n": 3, "ok": None,
              "crop": (1, 2)}
    assert redact_value(config) == {"cameras": [{"id": "gate", "source": "rtsp://a:***@h/s"}],
                                    "n": 3, "ok": None, "crop": (1, 2)}
