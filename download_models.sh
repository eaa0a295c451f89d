#!/usr/bin/env bash
# Download Stable Diffusion weights into ./checkpoints/ (and, with --clips, the original project's sample clips
# into ./data/). Re-running resumes: files already complete are skipped.
#
#   ./download_models.sh                 # CompVis/stable-diffusion-v1-4 -> ./checkpoints/stable-diffusion-v1-4
#   ./download_models.sh v1-5            # stable-diffusion-v1-5/stable-diffusion-v1-5
#   ./download_models.sh v2-1            # stabilityai/stable-diffusion-2-1 (768px, v-prediction)
#   ./download_models.sh <hub id>        # any diffusers SD 1.x/2.x repository, e.g. nitrosocke/mo-di-diffusion
#   ./download_models.sh --clips         # also fetch car-turn, man-skiing, man-surfing, rabbit-watermelon into ./data
#
# Needs the `hf` command of huggingface_hub (installed by requirements.txt). Gated repositories need `hf auth login`.
set -euo pipefail

model="v1-4"
clips=0
for arg in "$@"; do
  case "$arg" in
    --clips) clips=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) model="$arg" ;;
  esac
done

case "$model" in
  v1-4) repo="CompVis/stable-diffusion-v1-4" ;;
  v1-5) repo="stable-diffusion-v1-5/stable-diffusion-v1-5" ;;
  v2-1) repo="stabilityai/stable-diffusion-2-1" ;;
  */*) repo="$model" ;;
  *) echo "error: unknown model '$model': use v1-4, v1-5, v2-1 or a hub id like owner/name" >&2; exit 2 ;;
esac

if ! command -v hf >/dev/null 2>&1; then
  echo "error: the 'hf' command is missing: run 'pip install -r requirements.txt' (it comes with huggingface_hub)" >&2
  exit 2
fi

target="./checkpoints/$(basename "$repo")"
echo "downloading $repo into $target (resumable; re-run if it stops)"
# diffusers folders only: no full-precision .ckpt duplicates, no EMA or flax weights
include=()
for pattern in "model_index.json" "*/*.json" "*/*.txt" "unet/diffusion_pytorch_model.safetensors" \
  "vae/diffusion_pytorch_model.safetensors" "text_encoder/model.safetensors"; do
  include+=(--include "$pattern")
done
hf download "$repo" --local-dir "$target" "${include[@]}"

missing=0
for file in model_index.json unet/config.json unet/diffusion_pytorch_model.safetensors vae/config.json \
  vae/diffusion_pytorch_model.safetensors text_encoder/config.json text_encoder/model.safetensors \
  tokenizer/vocab.json tokenizer/merges.txt scheduler/scheduler_config.json; do
  if [ ! -s "$target/$file" ]; then
    echo "error: $target/$file is missing or empty after the download; run the script again" >&2
    missing=1
  fi
done
[ "$missing" -eq 0 ] || exit 1
echo "ok: $target is complete"

if [ "$clips" -eq 1 ]; then
  mkdir -p data
  for clip in car-turn man-skiing man-surfing rabbit-watermelon; do
    if [ -s "data/$clip.mp4" ]; then echo "data/$clip.mp4 already there"; continue; fi
    url="https://raw.githubusercontent.com/showlab/Tune-A-Video/main/data/$clip.mp4"
    echo "fetching $clip.mp4"
    curl -fL --retry 3 -C - -o "data/$clip.mp4.part" "$url" || { echo "error: could not download $url" >&2; exit 1; }
    mv "data/$clip.mp4.part" "data/$clip.mp4"
  done
fi
