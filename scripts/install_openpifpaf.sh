#!/usr/bin/env bash
# Build OpenPifPaf 0.13.11 (optional keypoint backend) against this venv's torch.
# Its sdist pins torch 1.13 for the build and compiles with -std=c++17, which torch 2.14's
# headers reject; it also calls matplotlib.cm.get_cmap, removed in matplotlib 3.9.
# We patch both in the unpacked sdist and build with --no-deps --no-build-isolation.
# Exit status 0 on success, non-zero otherwise (the caller decides what a failure means).
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
python="${1:-.venv/bin/python}"
version="0.13.11"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation "openpifpaf==$version" -d "$work"
tar -xzf "$work/openpifpaf-$version.tar.gz" -C "$work"
source_dir="$work/openpifpaf-$version"
sed -i 's/-std=c++17/-std=c++20/; s#/std:c++17#/std:c++20#' "$source_dir/setup.py"
grep -rl "matplotlib.cm.get_cmap\|cm.get_cmap" "$source_dir/src" | xargs -r sed -i \
    's/matplotlib\.cm\.get_cmap(/matplotlib.colormaps.get_cmap(/g; s/\bcm\.get_cmap(/matplotlib.colormaps.get_cmap(/g'
# its run-time dependencies other than torch/torchvision (which we keep at our pinned versions)
"$python" -m pip install --quiet pysparkling python-json-logger importlib_metadata
# torch >= 2.6 loads weights-only by default; OpenPifPaf checkpoints are pickled modules.
sed -i 's/torch\.load(checkpoint)/torch.load(checkpoint, weights_only=False)/; s/progress=self\.download_progress)/progress=self.download_progress, weights_only=False)/' \
    "$source_dir/src/openpifpaf/network/factory.py"
MAX_JOBS="$(nproc)" "$python" -m pip install --quiet --no-deps --no-build-isolation "$source_dir"
"$python" - <<'PY'
import openpifpaf
print(f"openpifpaf {openpifpaf.__version__} installed")
PY
