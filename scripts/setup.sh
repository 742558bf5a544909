#!/usr/bin/env bash
# Create .venv at the repository root and install keyreid with everything it and its tests need.
# Idempotent: re-running only reinstalls when pyproject.toml or these scripts changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $("$python" --version)"
    "$python" -m venv .venv
fi
stamp=.venv/.keyreid-setup
fingerprint="$(cat pyproject.toml scripts/setup.sh scripts/install_openpifpaf.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$fingerprint" ]; then
    echo "==> .venv is up to date"
    exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "==> installing keyreid (torch 2.14.1, timm, ultralytics, PyAV, SQLAlchemy, Streamlit, pytest, OpenVINO, ONNX Runtime, psycopg, FAISS, Ray, ...)"
.venv/bin/pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install --quiet -e ".[test,demo,cpu-fast,site]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, timm, ultralytics, av, sqlalchemy, streamlit" \
    || { echo "ERROR: core dependencies failed to install" >&2; exit 1; }
.venv/bin/python -c "import openvino, onnxruntime, onnx, onnxslim" 2>/dev/null \
    || echo "WARNING: OpenVINO / ONNX Runtime did not install: detector and encoder run on torch (slower on a CPU)."
if .venv/bin/python -c "import openpifpaf" 2>/dev/null; then
    echo "==> openpifpaf already installed"
else
    echo "==> building openpifpaf 0.13.11 (optional keypoint backend; a few minutes)"
    if bash scripts/install_openpifpaf.sh .venv/bin/python > .venv/openpifpaf-build.log 2>&1; then
        echo "==> openpifpaf installed"
    else
        echo "WARNING: openpifpaf could not be built (log: .venv/openpifpaf-build.log)."
        echo "         Keypoints will come from YOLO-pose ('auto' backend); everything else works."
    fi
fi
echo "$fingerprint" > "$stamp"
echo "==> ready: .venv/bin/python"
