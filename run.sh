#!/usr/bin/env bash
# VTG-R1 end to end: synthetic data / benchmarks -> teacher CoT + IoU filter -> SFT -> GRPO -> eval.
#
#   bash run.sh                 # the main job: the tiny preset on a CPU (the paper preset where GPUs are present)
#   bash run.sh tiny [--fresh]  # tiny preset: tiny random Qwen2.5-VL, synthetic videos, 2 CPU cores
#   bash run.sh test            # the whole test suite
#
# Every command creates or reuses .venv and installs requirements.txt once (re-installs only when the
# file changes). Each stage prints the plain command it runs, so any stage can be re-run by hand.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)

setup() {
    # A fresh machine has only Python: build the venv, install the pinned stack once.
    if [ ! -x .venv/bin/python ]; then
        echo "+ python3 -m venv .venv"
        python3 -m venv .venv
    fi
    local want have
    want=$(sha256sum requirements.txt | cut -d' ' -f1)
    have=$(cat .venv/.requirements.sha256 2>/dev/null || true)
    if [ "$want" != "$have" ]; then
        echo "+ .venv/bin/pip install -r requirements.txt   (torch with CUDA is ~5.5 GB: a minute or a few)"
        .venv/bin/pip install -qq --upgrade pip
        .venv/bin/pip install -qq -r requirements.txt
        echo "$want" > .venv/.requirements.sha256
    fi
    export PATH="$ROOT/.venv/bin:$PATH"
    # DeepSpeed JIT-builds its CPU comm op once (~20 s): keep the build between runs.
    export TORCH_EXTENSIONS_DIR="$ROOT/.torch_extensions"
    export FORCE_QWENVL_VIDEO_READER=decord
    export TOKENIZERS_PARALLELISM=false
}

run() { echo "+ $*"; "$@"; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }

tiny() {
    local RUN=${RUN:-runs/tiny}
    if [ "${1:-}" = "--fresh" ]; then run rm -rf "$RUN"; shift; fi
    mkdir -p "$RUN"
    # 1. synthetic videos with known events (each video: 3 coloured shapes in their own windows)
    [ -f "$RUN/data/test.jsonl" ] || run python data.py synth --out "$RUN/data" --train "${TRAIN_VIDEOS:-200}" \
        --test "${TEST_VIDEOS:-40}" --seed "${SEED:-0}"
    # 2. the tiny random Qwen2.5-VL, saved with save_pretrained
    [ -f "$RUN/base_model/config.json" ] || run python model.py tiny --out "$RUN/base_model"
    echo
    echo "Built $RUN/data and $RUN/base_model. Next stages (annotate, SFT, GRPO, eval) are added by their issues."
}

setup
case "${1:-}" in
    test) shift; run python -m pytest -q tests "$@" ;;
    tiny) shift; tiny "$@" ;;
    "") if has_gpu; then echo "GPUs found: the paper preset is 'bash run.sh paper' (not yet implemented)"; fi; tiny ;;
    *) echo "usage: bash run.sh [tiny [--fresh] | test [pytest args]]" >&2; exit 2 ;;
esac
