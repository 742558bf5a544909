"""`keyreid-dashboard` arguments -> the Streamlit command line and the script's settings."""
from app.dashboard.cli import build_parser, streamlit_command, streamlit_environment
from app.dashboard.data import DashboardSettings


def test_defaults_bind_to_localhost_headless_and_pass_the_database():
    args = build_parser().parse_args(["--db", "some/dir/keyreid.db"])
    command = streamlit_command(args)
    option = lambda name: command[command.index(name) + 1]
    assert command[1:4] == ["-m", "streamlit", "run"] and command[4].endswith("app/dashboard/ui.py")
    assert option("--server.address") == "127.0.0.1" and option("--server.port") == "8501"
    assert option("--server.headless") == "true"
    env = streamlit_environment(args, {"KEYREID_DASHBOARD_CHECKPOINT": "stale.pt"})
    settings = DashboardSettings.from_env(env)
    assert settings.db_url.startswith("sqlite:////") and settings.db_url.endswith("some/dir/keyreid.db")
    assert settings.checkpoint is None, "an inherited checkpoint setting is not used silently"


def test_host_port_and_encoder_options():
    args = build_parser().parse_args(["--db", "sqlite:///x.db", "--host", "0.0.0.0", "--port",
                                      "9000", "--model", "keyreid_vit_small", "--max-upload-mb", "5"])
    command = streamlit_command(args)
    assert command[command.index("--server.address") + 1] == "0.0.0.0"
    assert command[command.index("--server.maxUploadSize") + 1] == "5"
    settings = DashboardSettings.from_env(streamlit_environment(args, {}))
    assert (settings.db_url, settings.model, settings.max_upload_mb) == (
        "sqlite:///x.db", "keyreid_vit_small", 5.0)
