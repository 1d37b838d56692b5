#!/usr/bin/env bash
# Put the app's wheel and its pinned dependencies into .wheels/ so that the image builds offline.
#
#   deploy/compose/wheels.sh [PYTHON]
#
# PYTHON (default python3) must be Python 3.11 on x86_64 Linux, like the image's.
# torch must resolve to the CPU build: where pip does not find it locally, set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu. flwr comes without its
# [simulation] extra (ray), which deployment does not use. Wheels already in .wheels/ are reused.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
python="${1:-python3}"
out="$root/.wheels"
mkdir -p "$out"

"$python" - "$root/pyproject.toml" > "$out/requirements.txt" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
print("\n".join(dep.replace("flwr[simulation]", "flwr") for dep in deps))
PY

rm -f "$out"/fedra_flower-*.whl
"$python" -m pip wheel --quiet --wheel-dir "$out" --find-links "$out" -r "$out/requirements.txt"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$out" "$root"

# A CUDA torch would drag several GB of nvidia-* wheels into the image.
if compgen -G "$out/nvidia_*.whl" >/dev/null || ! compgen -G "$out/torch-*+cpu-*.whl" >/dev/null; then
  echo "error: $out holds no CPU build of torch (or holds nvidia-* wheels); remove $out and" \
       "rerun with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" >&2
  exit 1
fi
echo "wheels for the image: $out ($(ls "$out"/*.whl | wc -l) files, $(du -sh "$out" | cut -f1))"
