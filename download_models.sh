#!/usr/bin/env bash
# Download Stable Diffusion weights into ./checkpoints/ (and, with --clips, the original project's sample clips
# into ./data/; with --eval, the models that score edits). Re-running resumes: files already complete are skipped.
#
#   ./download_models.sh                 # CompVis/stable-diffusion-v1-4 -> ./checkpoints/stable-diffusion-v1-4
#   ./download_models.sh v1-5            # stable-diffusion-v1-5/stable-diffusion-v1-5
#   ./download_models.sh v2-1            # stabilityai/stable-diffusion-2-1 (768px, v-prediction)
#   ./download_models.sh <hub id>        # any diffusers SD 1.x/2.x repository, e.g. nitrosocke/mo-di-diffusion
#   ./download_models.sh --clips         # also fetch car-turn, man-skiing, man-surfing, rabbit-watermelon into ./data
#   ./download_models.sh --configs       # only the configs and tokenizers (no weights, under 2 MB) of SD 1.5 and 2.1
#                                        # into ./checkpoints/configs/: the architectures of single-file checkpoints
#                                        # (pretrained_model_path: a .safetensors/.ckpt), read offline; also fetched
#                                        # with every Stable Diffusion download
#   ./download_models.sh --eval          # only the models of `python -m tuneavideo.evaluate` (several GB):
#                                        # openai/clip-vit-large-patch14, yuvalkirstain/PickScore_v1 and the processor
#                                        # files (no weights) of laion/CLIP-ViT-H-14-laion2B-s32B-b79K; name a model
#                                        # too (./download_models.sh v1-4 --eval) to fetch Stable Diffusion as well
#   ./download_models.sh --controlnet canny   # only SD 1.5's ControlNet 1.1 canny (lllyasviel/control_v11p_sd15_canny)
#   ./download_models.sh --controlnet depth   # SD 1.5's ControlNet 1.1 depth (lllyasviel/control_v11f1p_sd15_depth)
#                                        # and its depth estimator, Intel/dpt-large -> ./checkpoints/dpt-large
#   ./download_models.sh --controlnet <hub id> # any diffusers ControlNet (it must fit the base model: see README)
#                                        # (repeatable; name a model too to fetch Stable Diffusion as well)
#
# Needs the `hf` command of huggingface_hub (installed by requirements.txt). Gated repositories need `hf auth login`.
set -euo pipefail

model=""
clips=0
eval_models=0
configs=0
controlnets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --clips) clips=1 ;;
    --eval) eval_models=1 ;;
    --configs) configs=1 ;;
    --controlnet)
      if [ $# -lt 2 ] || [ -z "$2" ] || [ "${2#-}" != "$2" ]; then
        echo "error: --controlnet needs a value: canny, depth or a hub id like owner/name" >&2; exit 2
      fi
      controlnets+=("$2"); shift ;;
    --controlnet=*) controlnets+=("${1#--controlnet=}") ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) model="$1" ;;
  esac
  shift
done
# Stable Diffusion unless only the evaluation models, the configs or ControlNets were asked for
if [ -z "$model" ] && [ "$eval_models" -eq 0 ] && [ "$configs" -eq 0 ] && [ ${#controlnets[@]} -eq 0 ]; then
  model="v1-4"
fi
if [ -n "$model" ]; then configs=1; fi

# each --controlnet as a hub id; depth also needs its depth estimator
controlnet_repos=()
depth_estimator=0
for name in ${controlnets[@]+"${controlnets[@]}"}; do
  case "$name" in
    canny) controlnet_repos+=("lllyasviel/control_v11p_sd15_canny") ;;
    depth) controlnet_repos+=("lllyasviel/control_v11f1p_sd15_depth"); depth_estimator=1 ;;
    */*) controlnet_repos+=("$name") ;;
    *) echo "error: unknown ControlNet '$name': use canny, depth or a hub id like owner/name" >&2; exit 2 ;;
  esac
done

case "$model" in
  "") repo="" ;;
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

# require_files FOLDER FILE...: each FILE (or one of its '|'-separated alternatives) is in FOLDER and not empty
require_files() {
  local target="$1" missing=0 file alternative found
  shift
  for file in "$@"; do
    found=0
    IFS='|' read -ra alternatives <<< "$file"
    for alternative in "${alternatives[@]}"; do
      if [ -s "$target/$alternative" ]; then found=1; fi
    done
    if [ "$found" -eq 0 ]; then
      echo "error: $target/${file//|/ or } is missing or empty after the download; run the script again" >&2
      missing=1
    fi
  done
  [ "$missing" -eq 0 ] || exit 1
  echo "ok: $target is complete"
}

if [ -n "$repo" ]; then
  target="./checkpoints/$(basename "$repo")"
  echo "downloading $repo into $target (resumable; re-run if it stops)"
  # diffusers folders only: no full-precision .ckpt duplicates, no EMA or flax weights
  include=()
  for pattern in "model_index.json" "*/*.json" "*/*.txt" "unet/diffusion_pytorch_model.safetensors" \
    "vae/diffusion_pytorch_model.safetensors" "text_encoder/model.safetensors"; do
    include+=(--include "$pattern")
  done
  hf download "$repo" --local-dir "$target" "${include[@]}"
  require_files "$target" model_index.json unet/config.json unet/diffusion_pytorch_model.safetensors vae/config.json \
    vae/diffusion_pytorch_model.safetensors text_encoder/config.json text_encoder/model.safetensors \
    tokenizer/vocab.json tokenizer/merges.txt scheduler/scheduler_config.json
fi

if [ "$configs" -eq 1 ]; then
  # what tuneavideo/base_model.py's DEFAULT_CONFIGS names: diffusers' config folders of the two families
  for config_repo in stable-diffusion-v1-5/stable-diffusion-v1-5 stabilityai/stable-diffusion-2-1; do
    target="./checkpoints/configs/$(basename "$config_repo")"
    echo "downloading the configs of $config_repo into $target"
    hf download "$config_repo" --local-dir "$target" --include "model_index.json" --include "*/*.json" \
      --include "*/*.txt"
    require_files "$target" model_index.json unet/config.json vae/config.json text_encoder/config.json \
      tokenizer/vocab.json tokenizer/merges.txt scheduler/scheduler_config.json
  done
fi

if [ "$eval_models" -eq 1 ]; then
  # the two scoring models: configs, processor and tokenizer files, and safetensors weights (not the .bin, TF or
  # flax copies); a repository without safetensors gets its pytorch_model.bin instead
  for eval_repo in openai/clip-vit-large-patch14 yuvalkirstain/PickScore_v1; do
    target="./checkpoints/$(basename "$eval_repo")"
    echo "downloading $eval_repo into $target (resumable; re-run if it stops)"
    hf download "$eval_repo" --local-dir "$target" --include "*.json" --include "*.txt" --include "model.safetensors"
    if [ ! -s "$target/model.safetensors" ]; then
      hf download "$eval_repo" --local-dir "$target" --include "pytorch_model.bin"
    fi
    processor=()  # the CLIP is scored with its own processor, PickScore with the one below
    if [ "$eval_repo" = openai/clip-vit-large-patch14 ]; then
      processor=(preprocessor_config.json "tokenizer.json|vocab.json")
    fi
    require_files "$target" config.json "model.safetensors|pytorch_model.bin" "${processor[@]}"
  done
  # PickScore's processor (image preprocessing and tokenizer) is its base model's: small files only, not the 4 GB
  # of ViT-H-14 weights
  eval_repo="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
  target="./checkpoints/$(basename "$eval_repo")"
  echo "downloading the processor files of $eval_repo into $target"
  hf download "$eval_repo" --local-dir "$target" --include "*.json" --include "*.txt"
  require_files "$target" preprocessor_config.json "tokenizer.json|vocab.json"
fi

for controlnet_repo in ${controlnet_repos[@]+"${controlnet_repos[@]}"}; do
  target="./checkpoints/$(basename "$controlnet_repo")"
  echo "downloading $controlnet_repo into $target (resumable; re-run if it stops)"
  # the diffusers ControlNet in full precision: safetensors, else the .bin (not the fp16 or original-format copies)
  hf download "$controlnet_repo" --local-dir "$target" --include "config.json" \
    --include "diffusion_pytorch_model.safetensors"
  if [ ! -s "$target/diffusion_pytorch_model.safetensors" ]; then
    hf download "$controlnet_repo" --local-dir "$target" --include "diffusion_pytorch_model.bin"
  fi
  require_files "$target" config.json "diffusion_pytorch_model.safetensors|diffusion_pytorch_model.bin"
done

if [ "$depth_estimator" -eq 1 ]; then
  # the depth condition's estimator (tuneavideo/video/conditions.py's DEPTH_ESTIMATOR), run by transformers'
  # depth-estimation pipeline
  target="./checkpoints/dpt-large"
  echo "downloading Intel/dpt-large into $target (resumable; re-run if it stops)"
  hf download Intel/dpt-large --local-dir "$target" --include "*.json" --include "model.safetensors"
  if [ ! -s "$target/model.safetensors" ]; then
    hf download Intel/dpt-large --local-dir "$target" --include "pytorch_model.bin"
  fi
  require_files "$target" config.json preprocessor_config.json "model.safetensors|pytorch_model.bin"
fi

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
