#!/usr/bin/env bash
# Fetch into .whl/ (ignored by git) the wheels benchmarks/gpu_check.sh installs on a GPU machine that has Python 3.12
# with torch, transformers (5.x) and accelerate but no diffusers, peft, omegaconf, PyAV or imageio-ffmpeg and no network. Run here, from any folder:
#     bash benchmarks/gpu_wheels.sh
# diffusers is pure Python; what it requires (filelock, huggingface-hub >= 1.32, numpy, regex, requests,
# safetensors >= 0.8, Pillow, packaging) comes with such an image, and on Python >= 3.8 it takes importlib.metadata
# from the standard library. peft and omegaconf are pure Python (their requirements come with such an image); PyAV's
# and imageio-ffmpeg's wheels ship their own FFmpeg. The edit jobs build their settings from tuneavideo.request, which
# imports the run folder's and the video modules (omegaconf, PyAV, imageio-ffmpeg).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 peft==0.21.2 omegaconf==2.4.0 av==18.1.1 imageio-ffmpeg==0.8.1
