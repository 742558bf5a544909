"""`keyreid-dashboard`: run the Streamlit dashboard over a watcher database.

    keyreid-dashboard --db sqlite:///keyreid.db [--host 127.0.0.1] [--port 8501]
                      [--checkpoint reid.pt | --model keyreid_vit_tiny] [--device cpu]

The dashboard binds to 127.0.0.1 unless told otherwise (it has no login: exposing it is an
explicit choice), runs headless, and opens the database read-only. Settings reach the
Streamlit script as environment variables (`app.dashboard.data.ENV_*`), the one channel that
works the same under `streamlit run` and Streamlit's AppTest.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from storage import validate_database_url

from .data import (
    DEFAULT_MAX_UPLOAD_MB,
    ENV_CHECKPOINT,
    ENV_DB,
    ENV_DEVICE,
    ENV_MAX_UPLOAD_MB,
    ENV_MODEL,
    as_database_url,
)

SCRIPT = Path(__file__).with_name("ui.py")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyreid-dashboard",
        description="Search people across cameras in a KeyRe-ID Watch database (Streamlit).")
    parser.add_argument("--db", required=True,
                        help="database URL (sqlite:///keyreid.db) or a SQLite file path")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    parser.add_argument("--checkpoint", default=None,
                        help="re-id checkpoint for search by upload (default: the one in the "
                             "watcher's latest run configuration); must be the watcher's")
    parser.add_argument("--model", default=None,
                        help="model name when there is no checkpoint (default keyreid_vit_tiny)")
    parser.add_argument("--device", default=None, help="encoder device (default: cuda if any)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest accepted upload in MB (default {DEFAULT_MAX_UPLOAD_MB})")
    return parser


def streamlit_command(args: argparse.Namespace) -> list[str]:
    """The `python -m streamlit run` command line for these arguments."""
    return [
        sys.executable, "-m", "streamlit", "run", str(SCRIPT),
        "--server.address", args.host,
        "--server.port", str(args.port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--server.maxUploadSize", str(max(1, int(-(-args.max_upload_mb // 1)))),
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
        "--global.developmentMode", "false",
    ]


def streamlit_environment(args: argparse.Namespace, base: dict[str, str]) -> dict[str, str]:
    """`base` plus the dashboard settings, and this checkout on PYTHONPATH for `import app`."""
    env = dict(base)
    env[ENV_DB] = as_database_url(args.db)
    env[ENV_MAX_UPLOAD_MB] = str(args.max_upload_mb)
    for name, value in ((ENV_CHECKPOINT, args.checkpoint), (ENV_MODEL, args.model),
                        (ENV_DEVICE, args.device)):
        if value:
            env[name] = value
        else:
            env.pop(name, None)
    root = str(SCRIPT.resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, base.get("PYTHONPATH")) if p)
    return env


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.checkpoint and not Path(args.checkpoint).is_file():
        print(f"keyreid-dashboard: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    url = as_database_url(args.db)
    problem = validate_database_url(url, readonly=True)
    if problem:
        # Still start: the page says the same and works once the watcher creates the database.
        print(f"keyreid-dashboard: warning: {problem}", file=sys.stderr)
    print(f"keyreid-dashboard: serving {url} read-only on http://{args.host}:{args.port}",
          file=sys.stderr)
    command = streamlit_command(args)
    env = streamlit_environment(args, dict(os.environ))
    sys.stdout.flush()
    sys.stderr.flush()
    # Replace this process: signals sent to keyreid-dashboard reach Streamlit directly.
    os.execve(command[0], command, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
