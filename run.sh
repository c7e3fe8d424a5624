#!/usr/bin/env bash
# VTG-R1 end to end: data -> teacher CoT + IoU split -> SFT -> GRPO -> eval.
#
#   bash run.sh                   # the main job: the tiny preset where no GPU is present, else the paper preset
#   bash run.sh tiny [--fresh]    # tiny random Qwen2.5-VL + synthetic videos, 2 CPU cores, ~12 min
#   bash run.sh paper [--dry-run] # Qwen2.5-VL-7B on 2 nodes x 8 H100 (HOSTFILE), the paper's hyperparameters
#   bash run.sh test [pytest args]# the test suite
#
# Every command creates or reuses .venv and installs requirements.txt once (again only when the file
# changes). Each stage prints the plain command it runs and skips work it finds done, so re-running after
# a crash or Ctrl-C continues where it stopped. Settings pass through as environment variables, e.g.
#   RUN=runs/tiny2 NFRAMES=8 SFT_STEPS=400 bash run.sh tiny
#   SFT_ARGS="--lr 5e-4" GRPO_ARGS="--temperature 0.8" EVAL_ARGS="--batch-size 8" bash run.sh tiny
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
    # DeepSpeed JIT-builds its CPU comm op once (~20-90 s): keep the build between runs.
    export TORCH_EXTENSIONS_DIR="$ROOT/.torch_extensions"
    export FORCE_QWENVL_VIDEO_READER=decord TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error}
    # On a CPU, one intra-op thread per process by default: the tests start 2 DeepSpeed processes on 2
    # cores, and more threads than cores slows every step. The tiny preset's stages run one process
    # each and take all the cores instead (tiny()).
    USER_THREADS=${OMP_NUM_THREADS:-}
    has_gpu || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
}

run() { echo; echo "+ $*"; "$@"; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }

# -----------------------------------------------------------------------------
# Tiny preset: every stage of the paper, small enough for 2 CPU cores.
tiny() {
    local RUN=${RUN:-runs/tiny}
    if [ "${1:-}" = "--fresh" ]; then run rm -rf "$RUN"; shift; fi
    [ $# -eq 0 ] || { echo "unknown argument: $1 (settings go in environment variables; see run.sh)" >&2; exit 2; }
    mkdir -p "$RUN"
    local t0=$SECONDS
    # Every stage below is one process: let torch use every core (2 threads on 2 cores: an SFT step
    # takes 0.35 s instead of 0.57 s with 1, measured).
    export OMP_NUM_THREADS=${USER_THREADS:-$(env -u OMP_NUM_THREADS nproc)}  # nproc itself obeys OMP_NUM_THREADS
    # The tiny video setting: 16 frames of 56x56 px (8 temporal patches x 4 tokens = 32 video tokens).
    local NFRAMES=${NFRAMES:-16} PIX=${MAX_PIXELS:-3136}
    local VIDEO="--nframes $NFRAMES --max-pixels $PIX --min-pixels $PIX"

    # 1. synthetic videos with known events (3 coloured shapes per video, each in its own window)
    [ -f "$RUN/data/test.jsonl" ] || run python data.py synth --out "$RUN/data" \
        --train "${TRAIN_VIDEOS:-1500}" --test "${TEST_VIDEOS:-100}" --seed "${SEED:-0}"
    # 2. the tiny random Qwen2.5-VL (a real one, saved with save_pretrained)
    [ -f "$RUN/base_model/config.json" ] || run python model.py tiny --out "$RUN/base_model" \
        --hidden "${HIDDEN:-128}" --layers "${LAYERS:-2}" --heads "${HEADS:-4}" --vision-hidden "${VISION_HIDDEN:-64}" \
        --vision-depth "${VISION_DEPTH:-2}"
    # 3+4. teacher CoT from the dense captions (with deliberate mistakes) and the IoU split:
    #      IoU > 0.8 -> coldstart.jsonl, 0.4 <= IoU <= 0.8 -> rl.jsonl, IoU < 0.4 dropped. Cached: re-runs are free.
    run python annotate.py --data "$RUN/data/train.jsonl" --teacher captions --noise "${NOISE:-0.3}" \
        --out "$RUN/annotate" ${ANNOTATE_ARGS:-}
    # 5. cold-start SFT (resumable; a finished run returns at once). The random ViT stays frozen: trained
    #    from scratch on this little data it collapses to one vector for every video token (model.freeze_vision).
    run python sft.py --model "$RUN/base_model" --data "$RUN/annotate/coldstart.jsonl" --out "$RUN/sft" \
        --max-steps "${SFT_STEPS:-1800}" --batch-size "${SFT_BATCH:-32}" --micro-batch "${SFT_BATCH:-32}" \
        --lr "${SFT_LR:-2e-3}" --freeze-vision \
        --warmup-ratio 0.05 $VIDEO --resume ${SFT_ARGS:-}
    # 6. GRPO from the SFT model on the RL set (the original ground truth), reward 0.9 IoU + 0.1 format
    run python grpo.py --model "$RUN/sft/model" --data "$RUN/annotate/rl.jsonl" --out "$RUN/grpo" \
        --steps "${GRPO_STEPS:-40}" --group-size 8 --prompts-per-step "${GRPO_PROMPTS:-8}" --lr "${GRPO_LR:-1e-5}" \
        --max-new-tokens "${MAX_NEW_TOKENS:-200}" --freeze-vision $VIDEO --resume ${GRPO_ARGS:-}
    # 7. held-out test videos: base, SFT, SFT+GRPO, and the best constant span fitted on the train set
    local name
    for name in base sft grpo; do
        local model_dir=$RUN/base_model
        [ $name = sft ] && model_dir=$RUN/sft/model
        [ $name = grpo ] && model_dir=$RUN/grpo/model
        [ -f "$RUN/eval/$name/metrics.json" ] || run python eval.py --model "$model_dir" \
            --data "$RUN/data/test.jsonl" --out "$RUN/eval/$name" $VIDEO \
            --max-new-tokens "${MAX_NEW_TOKENS:-200}" --batch-size 40 ${EVAL_ARGS:-}
    done
    [ -f "$RUN/eval/constant_baseline/metrics.json" ] || run python eval.py baseline \
        --train "$RUN/data/train.jsonl" --test "$RUN/data/test.jsonl" --out "$RUN/eval/constant_baseline"
    run python - "$RUN" $((SECONDS - t0)) <<'EOF'
import json, sys
run, wall = sys.argv[1], float(sys.argv[2])
rows = {"base": "base (random init)", "sft": "cold-start SFT", "grpo": "SFT + GRPO",
        "constant_baseline": "best constant span"}
res = {}
print(f"\nTiny preset, held-out synthetic test set ({run}/eval), percent:")
print(f"{'model':<22}{'R1@0.3':>9}{'R1@0.5':>9}{'R1@0.7':>9}{'mIoU':>9}")
for k, label in rows.items():
    m = json.load(open(f"{run}/eval/{k}/metrics.json"))["overall"]
    res[k] = {key: m[key] for key in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "n")}
    print(f"{label:<22}" + "".join(f"{m[key]:>9.2f}" for key in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")))
res["wall_seconds"] = wall  # this invocation's wall time (stages found done are not re-counted)
tmp = f"{run}/results.json.tmp"
json.dump(res, open(tmp, "w"), indent=2)
import os; os.replace(tmp, f"{run}/results.json")
print(f"\nwrote {run}/results.json; GRPO reward curve: {run}/grpo/curves.png; wall time {wall:.0f} s")
EOF
}

# -----------------------------------------------------------------------------
# Paper preset: Qwen2.5-VL-7B, 2 nodes x 8 H100, the paper's hyperparameters (SPEC.md).
paper() {
    local RUN=${RUN:-runs/paper} DRY=0
    [ "${1:-}" = "--dry-run" ] && DRY=1
    local MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
    local HOSTFILE=${HOSTFILE:-hostfile}       # "node1 slots=8\nnode2 slots=8"
    local VIDEOS=${VIDEO_ROOT:-$RUN/videos}     # VideoMind-Dataset layout: <dataset>/videos/...
    local SFT_LAUNCH="deepspeed --num_nodes 1 --num_gpus 8"   # SFT's global batch 8 fits one node, not 16 ranks
    local RL_LAUNCH="deepspeed --hostfile $HOSTFILE --num_nodes 2 --num_gpus 8"
    local SFT="sft.py --model $RUN/base_model --data $RUN/data/coldstart.jsonl --out $RUN/sft --epochs 1 --lr 1e-6 \
        --batch-size 8 --micro-batch 1 --zero-stage 3 --grad-ckpt --bf16 --no-cache-videos --resume"
    local GRPO="grpo.py --model $RUN/sft/model --data $RUN/data/rl.jsonl --out $RUN/grpo --group-size 8 \
        --prompts-per-step 128 --steps 600 --lr 1e-6 --beta 0 --max-new-tokens 2048 --temperature 1.0 \
        --zero-stage 3 --grad-ckpt --gather-for-rollout --bf16 --save-every 50 --resume"
    if [ $DRY = 1 ]; then
        echo "== dry run: no GPU, no download. Checking what can be checked and printing the plan."
        # Every stage's command line parses and its batch arithmetic holds for the ranks it runs on.
        run python $SFT --dry-run --world-size 8
        run python $GRPO --dry-run --world-size 16
        run python eval.py --help >/dev/null
        run python annotate.py --help >/dev/null
        run python plan.py
        echo
        echo "== the plan (bash run.sh paper on the first node of $HOSTFILE):"
        echo "   1. download $MODEL -> $RUN/base_model; TVG processed data -> $RUN/hf; videos -> $VIDEOS"
        echo "   2. annotate with Gemini if GEMINI_API_KEY is set, else use the released cold-start/RL files"
        echo "   3. $SFT_LAUNCH $SFT"
        echo "   4. $RL_LAUNCH $GRPO"
        echo "   5. eval.py on Charades-STA, NExT-GQA, ReXTime with 8 GPUs (torchrun --nproc_per_node 8)"
        return
    fi
    has_gpu || { echo "the paper preset needs GPUs (try 'bash run.sh paper --dry-run')" >&2; exit 2; }
    mkdir -p "$RUN/data"
    # 1. weights and data from the hub (skipped when present)
    [ -f "$RUN/base_model/config.json" ] || run hf download "$MODEL" --local-dir "$RUN/base_model"
    [ -d "$RUN/hf" ] || run hf download RuizheChen/TVG_processed_data --repo-type dataset --local-dir "$RUN/hf"
    [ -d "$VIDEOS" ] || run hf download yeliudev/VideoMind-Dataset --repo-type dataset --local-dir "$VIDEOS" \
        --include "didemo/*" "tacos/*" "queryd/*" "hirest/*" "internvid_vtime/*" "charades_sta/*" \
        "nextqa/*" "rextime/*" "activitynet/*" "qvhighlights/*"
    # 2. cold-start and RL sets: our own Gemini annotation when a key is set, else the released files
    if [ -n "${GEMINI_API_KEY:-}" ]; then
        [ -f "$RUN/data/train.jsonl" ] || run python data.py convert --format tvg_r1 \
            --input "${TRAIN_JSON:?set TRAIN_JSON to the 56K raw annotation JSON}" --video-root "$VIDEOS" --out "$RUN/data/train.jsonl"
        run python annotate.py --data "$RUN/data/train.jsonl" --teacher gemini --out "$RUN/data" --concurrency 16
    else
        # The released files (TVG-R1 training JSON: problem / video / video_length / gt_frame / dataset)
        [ -f "$RUN/data/rl.jsonl" ] || run python data.py convert --format tvg_r1 \
            --input "${RL_JSON:-$(ls "$RUN"/hf/*[Rr][Ll]*.json | head -n1)}" --video-root "$VIDEOS" --out "$RUN/data/rl.jsonl"
        [ -f "$RUN/data/coldstart.jsonl" ] || run python data.py convert --format tvg_r1 \
            --input "${COLDSTART_JSON:-$(ls "$RUN"/hf/*[Cc]old*.json | head -n1)}" --video-root "$VIDEOS" --out "$RUN/data/coldstart.jsonl"
    fi
    # 3-4. SFT on one node, GRPO on two
    [ -d "$RUN/sft/model" ] || run $SFT_LAUNCH $SFT
    [ -d "$RUN/grpo/model" ] || run $RL_LAUNCH $GRPO
    # 5. the three benchmarks (the paper's: 64 frames, 128*28*28 px, greedy, 2048 new tokens)
    local fmt file
    for fmt in charades_sta nextgqa rextime; do
        case $fmt in
            charades_sta) file=../shared/data/charades_sta/charades_sta_test.txt ;;
            nextgqa) file=../shared/data/nextgqa/test.csv ;;
            rextime) file=../shared/data/rextime/rextime_val.jsonl ;;
        esac
        # VideoMind-Dataset's layout; ReXTime's reader wants <root>/{activitynet,qvhighlights}/<vid>.mp4
        local extra
        case $fmt in
            charades_sta) extra="--video-root $VIDEOS/charades_sta/videos_3fps_480_noaudio
                                 --durations $VIDEOS/charades_sta/durations.json" ;;
            nextgqa) extra="--video-root $VIDEOS/nextqa/videos" ;;
            rextime) mkdir -p "$RUN/rextime_videos"
                     ln -sfn "$(realpath "$VIDEOS")/activitynet/videos_3fps_480_noaudio" "$RUN/rextime_videos/activitynet"
                     ln -sfn "$(realpath "$VIDEOS")/qvhighlights/videos_3fps_480_noaudio" "$RUN/rextime_videos/qvhighlights"
                     extra="--video-root $RUN/rextime_videos" ;;
        esac
        run torchrun --nproc_per_node 8 eval.py --model "$RUN/grpo/model" --format $fmt --data $file $extra \
            --out "$RUN/eval/$fmt"
    done
}

setup
case "${1:-}" in
    test) shift; run python -m pytest -q tests "$@" ;;
    tiny) shift; tiny "$@" ;;
    paper) shift; paper "$@" ;;
    "") if has_gpu; then paper; else tiny; fi ;;
    *) echo "usage: bash run.sh [tiny [--fresh] | paper [--dry-run] | test [pytest args]]" >&2; exit 2 ;;
esac
