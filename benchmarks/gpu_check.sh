#!/usr/bin/env bash
# The GPU figures README "Memory and speed" lacks, in under 8 minutes on one NVIDIA H100 or H200, as JSON:
#
#     bash benchmarks/gpu_check.sh [OUTPUT.json]          # default gpu_check.json; see benchmarks/gpu_check.py
#     bash benchmarks/gpu_check.sh --tiny /tmp/check.json # the tiny model on the CPU, to check this script
#
# Needs torch, transformers and accelerate. diffusers, peft, omegaconf, PyAV and imageio-ffmpeg may come as wheels in
# .whl/ at the repository root, for a machine that cannot download them: `bash benchmarks/gpu_wheels.sh` fetches
# them beforehand on one that can (wheels are not committed); this script installs what .whl/ holds into a
# temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1  # everything is built here: nothing may be fetched
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
