#!/usr/bin/env bash
# VTG-R1 end to end: data -> teacher CoT + IoU split -> SFT -> GRPO -> eval.
#
#   bash run.sh                   # the main job: the tiny preset where no GPU is present, else the paper preset
#   bash run.sh tiny [--fresh]    # tiny random Qwen2.5-VL + synthetic videos, 2 CPU cores, ~15 min
#   bash run.sh taro [--fresh]    # the tiny preset, plus TaRO from the same SFT model: SFT / GRPO / TaRO table
#   bash run.sh ablations         # the paper's Tables 3 and 4 on the tiny preset (2 seeds, the main run reused)
#   SEEDS=3 bash run.sh           # the tiny preset over 3 training seeds (same data): mean, spread, per-seed lift
#                                 # (seeds run 2 at a time on a CPU, 1 thread each: JOBS=1 for one after the other)
#   bash run.sh paper [--dry-run] # Qwen2.5-VL-7B on 2 nodes x 8 H100 (HOSTFILE), the paper's hyperparameters
#   bash run.sh paper --rehearsal # the same stage commands on a CPU: a miniature released world, tiny sizes
#   bash run.sh gpu-check         # on one NVIDIA GPU, ~5 min: NCCL, bf16, the update's memory, rollout speed
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

run() {  # print the command, run it, print its wall time (a finished stage that resumes shows 0 s)
    # Its status is the command's: `[ -f x ] || run ...` runs without errexit, so it must not be lost.
    local t=$SECONDS rc=0
    echo; echo "+ $*"; "$@" || rc=$?
    echo "  ($((SECONDS - t)) s)"
    return $rc
}

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }

# -----------------------------------------------------------------------------
# Tiny preset: every stage of the paper, small enough for 2 CPU cores.
tiny() {
    local RUN=${RUN:-runs/tiny} MODE=main
    while [ $# -gt 0 ]; do
        case "$1" in
            --fresh) run rm -rf "$RUN" ;;
            --taro) MODE=taro ;;            # bash run.sh taro: also TaRO from the same SFT model, data and steps
            --ablations) MODE=ablations ;;  # bash run.sh ablations: the paper's Tables 3 and 4 in miniature
            *) echo "unknown argument: $1 (settings go in environment variables; see run.sh)" >&2; exit 2 ;;
        esac
        shift
    done
    local SEEDS=${SEEDS:-1}
    [ $MODE = ablations ] && [ "$SEEDS" -lt 2 ] && SEEDS=2  # each ablation row is a mean over >= 2 seeds
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
    #      IoU > 0.8 -> coldstart.jsonl, 0.4 <= IoU <= 0.8 -> rl.jsonl, IoU < 0.4 dropped (and, for the
    #      ablations, the same without the filters: *_unfiltered.jsonl). Cached: re-runs are free.
    run python annotate.py --data "$RUN/data/train.jsonl" --teacher captions --noise "${NOISE:-0.3}" \
        --out "$RUN/annotate" ${ANNOTATE_ARGS:-}

    # 5-7 per training seed (the same data; seed 0 in $RUN, seed s in $RUN/seed$s): the cold-start SFT,
    # GRPO from it, and their evals on the held-out test videos. Every stage is resumable and a finished
    # one returns at once. The random ViT stays frozen: trained from scratch on this little data it
    # collapses to one vector for every video token (model.freeze_vision).
    # 600 constant-lr SFT steps, each batch holding every query of the videos it covers
    # (--group-by-video): the model learns to read the query (the "binding transition", README: the
    # diagnosis) sooner than with a shuffled order: by step 400-500 in the two seeds probed, by 600 in
    # 4 of 5 runs, where 900 shuffled steps reached it in 7 of 14. 600 steps stop just past it: a weak
    # cold start that GRPO lifts (+4.9 to +10.4 in four runs), ~150 s sooner than 900; SFT_STEPS=900
    # gives stronger final models (55-57 mIoU when past the transition) and smaller lifts.
    local ANN=$RUN/annotate seed S
    sft_stage() {  # sft_stage OUT DATA: cold-start SFT of the base model
        run python sft.py --model "$RUN/base_model" --data "$2" --out "$1" --seed $seed \
            --max-steps "${SFT_STEPS:-600}" --batch-size "${SFT_BATCH:-32}" --micro-batch "${SFT_BATCH:-32}" \
            --lr "${SFT_LR:-2e-3}" --schedule "${SFT_SCHEDULE:-constant}" --freeze-vision --warmup-ratio 0.05 \
            --group-by-video \
            $VIDEO --resume ${SFT_ARGS:-}
    }
    grpo_stage() {  # grpo_stage OUT MODEL DATA [STEPS [extra flags]]: GRPO, reward 0.9 IoU + 0.1 format (original GT)
        run python grpo.py --model "$2" --data "$3" --out "$1" --seed $seed --steps "${4:-${GRPO_STEPS:-250}}" \
            --group-size 8 --prompts-per-step "${GRPO_PROMPTS:-8}" --lr "${GRPO_LR:-5e-5}" \
            --max-new-tokens "${MAX_NEW_TOKENS:-200}" --freeze-vision $VIDEO --resume ${GRPO_ARGS:-} "${@:5}"
    }
    eval_stage() {  # eval_stage OUT MODEL: the held-out test videos
        [ -f "$1/metrics.json" ] || run python eval.py --model "$2" --data "$RUN/data/test.jsonl" --out "$1" $VIDEO \
            --max-new-tokens "${MAX_NEW_TOKENS:-200}" --batch-size 40 ${EVAL_ARGS:-}
    }
    seed_chain() {  # seed_chain SEED: every stage of one training seed, in order
        local seed=$1 S=$RUN; [ $1 = 0 ] || S=$RUN/seed$1
        sft_stage "$S/sft" "$ANN/coldstart.jsonl"
        eval_stage "$S/eval/sft" "$S/sft/model"
        grpo_stage "$S/grpo" "$S/sft/model" "$ANN/rl.jsonl"
        eval_stage "$S/eval/grpo" "$S/grpo/model"
        if [ $MODE = taro ]; then  # the same GRPO command with --taro (TaRO's constants), same start and data
            grpo_stage "$S/taro" "$S/sft/model" "$ANN/rl.jsonl" "" --taro ${TARO_ARGS:-}
            eval_stage "$S/eval/taro" "$S/taro/model"
        fi
        if [ $MODE = ablations ]; then  # the paper's Tables 3 and 4: one switch each, the rest shared
            sft_stage "$S/sft_unfiltered" "$ANN/coldstart_unfiltered.jsonl"           # R1-U: every teacher answer
            grpo_stage "$S/grpo_r1u" "$S/sft_unfiltered/model" "$ANN/rl.jsonl"
            grpo_stage "$S/grpo_rl_unfiltered" "$S/sft/model" "$ANN/rl_unfiltered.jsonl"  # the IoU < 0.4 kept
            # R1-Zero: GRPO from the base model. A random-init base earns no reward (no answer parses), so
            # every group's advantage is 0 and nothing moves: a few steps show it (ZERO_STEPS).
            grpo_stage "$S/zero" "$RUN/base_model" "$ANN/rl.jsonl" "${ZERO_STEPS:-10}"
            grpo_stage "$S/zero_unfiltered" "$RUN/base_model" "$ANN/rl_unfiltered.jsonl" "${ZERO_STEPS:-10}"
            local name
            for name in grpo_r1u grpo_rl_unfiltered zero zero_unfiltered; do
                eval_stage "$S/eval/$name" "$S/$name/model"
            done
        fi
    }
    # Seeds run side by side on JOBS workers (seed s on worker s % JOBS), the cores split between them.
    # Measured on 2 cores, two single-thread runs against one after the other on both cores: GRPO
    # 1.8x (2.1-2.2 s/step each, 1.94 alone; 1.1x before the rollout held the prompt's cache once),
    # SFT 1.0x after its first epoch (0.8-0.9 s/step each, ~0.42 alone: memory-bound), more while it
    # decodes videos. Worker 0 prints here, the others write
    # $RUN/worker<j>.log. Every stage is resumable, so a re-run after a failure continues.
    local JOBS=${JOBS:-$([ "$SEEDS" -gt 1 ] && ! has_gpu && echo 2 || echo 1)} j pids=() failed=0
    [ "$JOBS" -le "$SEEDS" ] || JOBS=$SEEDS
    local threads=$(( $(env -u OMP_NUM_THREADS nproc) / JOBS )); [ "$threads" -ge 1 ] || threads=1
    worker() {  # worker J: its seeds, one after the other
        [ "$JOBS" = 1 ] || export OMP_NUM_THREADS=${USER_THREADS:-$threads}
        for seed in $(seq "$1" "$JOBS" $((SEEDS - 1))); do seed_chain "$seed"; done
    }
    # Workers run in the background (worker 0 too: `set -e` holds in a background subshell, not in one
    # tested by ||). Background jobs of a script ignore Ctrl-C, so the trap stops them with the script.
    kill_tree() { local c; for c in $(pgrep -P "$1" || true); do kill_tree "$c"; done; kill "$1" 2>/dev/null || true; }
    trap 'for p in "${pids[@]}"; do kill_tree "$p"; done' EXIT
    trap 'exit 130' INT TERM
    for j in $(seq 0 $((JOBS - 1))); do
        if [ "$j" = 0 ]; then
            ( worker 0 ) &
        else
            echo "seeds $(seq -s ' ' "$j" "$JOBS" $((SEEDS - 1))) run alongside (JOBS=$JOBS, $threads thread(s) each): log in $RUN/worker$j.log"
            ( worker "$j" ) > "$RUN/worker$j.log" 2>&1 &
        fi
        pids+=($!)
    done
    for j in "${pids[@]}"; do  # the first worker to fail stops the others
        wait -n || { [ $failed = 1 ] || for p in "${pids[@]}"; do kill_tree "$p"; done; failed=1; }
    done
    pids=()
    trap - EXIT INT TERM
    if [ $failed = 1 ]; then
        echo "a training seed failed: see the output above$([ "$JOBS" = 1 ] || echo " and $RUN/worker*.log") (a re-run continues where it stopped)" >&2
        exit 1
    fi
    eval_stage "$RUN/eval/base" "$RUN/base_model"  # the same base model for every seed
    [ -f "$RUN/eval/constant_baseline/metrics.json" ] || run python eval.py baseline \
        --train "$RUN/data/train.jsonl" --test "$RUN/data/test.jsonl" --out "$RUN/eval/constant_baseline"
    run python - "$RUN" $((SECONDS - t0)) "$SEEDS" "$MODE" <<'EOF'
import json, math, os, sys
run, wall, seeds, mode = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
keys = ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")
dirs = [run] + [f"{run}/seed{s}" for s in range(1, seeds)]


def metrics(path):
    m = json.load(open(f"{path}/metrics.json"))["overall"]
    return {k: m[k] for k in keys + ("n",)}


def mean_std(rows):  # over seeds, sample std (n - 1)
    out = {}
    for k in keys:
        xs = [r[k] for r in rows]
        mu = sum(xs) / len(xs)
        out[k] = mu
        out[k + "_std"] = math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    out["n"], out["seeds"] = rows[0]["n"], len(rows)
    return out


def table(title, rows):
    print(f"\n{title}")
    print(f"{'model':<34}" + "".join(f"{k:>15}" for k in keys))
    for label, r in rows:
        cells = (f"{r[k]:>9.2f} ± {r[k + '_std']:<4.2f}" if r.get("seeds", 1) > 1 else f"{r[k]:>15.2f}" for k in keys)
        print(f"{label:<34}" + "".join(cells))


rows = {"base": "base (random init)", "sft": "cold-start SFT", "grpo": "SFT + GRPO", "taro": "SFT + TaRO",
        "constant_baseline": "best constant span"}
res = {k: metrics(f"{run}/eval/{k}") for k in rows if os.path.isfile(f"{run}/eval/{k}/metrics.json")}
table(f"Tiny preset, held-out synthetic test set ({run}/eval), percent, seed 0:",
      [(rows[k], res[k]) for k in res])
if seeds > 1:
    res["seeds"] = [{"seed": s, **{k: metrics(f"{d}/eval/{k}") for k in ("sft", "grpo", "taro")
                                   if os.path.isfile(f"{d}/eval/{k}/metrics.json")}} for s, d in enumerate(dirs)]
    mean = {k: mean_std([r[k] for r in res["seeds"]]) for k in ("sft", "grpo", "taro")
            if all(k in r for r in res["seeds"])}
    res["mean_over_seeds"] = mean
    table(f"The same over {seeds} training seeds (mean ± std):", [(rows[k], mean[k]) for k in mean])
    lifts = [r["grpo"]["mIoU"] - r["sft"]["mIoU"] for r in res["seeds"]]
    print(f"GRPO's lift over SFT, mIoU points, per seed: {', '.join(f'{x:+.2f}' for x in lifts)}")
if mode == "ablations":
    ab = {"sft": "SFT only (filtered cold start)", "grpo": "TVG-R1: filtered + filtered RL",
          "grpo_r1u": "R1-U: unfiltered cold start", "grpo_rl_unfiltered": "unfiltered RL data",
          "zero": "R1-Zero (RL data filtered)", "zero_unfiltered": "R1-Zero (RL data unfiltered)"}
    res["ablations"] = {k: mean_std([metrics(f"{d}/eval/{k}") for d in dirs]) for k in ab}
    table(f"Ablations (the paper's Tables 3 and 4), mean ± std over {seeds} seeds, percent:",
          [(ab[k], res["ablations"][k]) for k in ab])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, label in (("grpo", "TVG-R1 (SFT + GRPO)"), ("zero", "R1-Zero (GRPO from the base)")):
        recs = [json.loads(ln) for ln in open(f"{run}/{name}/metrics.jsonl") if ln.strip()]
        a.plot([r["step"] for r in recs], [r["reward"] for r in recs], label=label)
        b.plot([r["step"] for r in recs], [r["length"] for r in recs], label=label)
    a.set(xlabel="step", ylabel="mean reward", title="reward (0.9 IoU + 0.1 format)")
    b.set(xlabel="step", ylabel="tokens", title="response length")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{run}/ablations.png", dpi=120)
    print(f"\nwrote {run}/ablations.png (reward and response length, TVG-R1 against R1-Zero, seed 0)")
res["wall_seconds"] = wall  # this invocation's wall time (stages found done are not re-counted)
tmp = f"{run}/results.json.tmp"
json.dump(res, open(tmp, "w"), indent=2)
os.replace(tmp, f"{run}/results.json")
curves = " and ".join(f"{run}/{k}/curves.png" for k in ("grpo", "taro") if k in res)
print(f"\nwrote {run}/results.json; reward curves: {curves}; wall time {wall:.0f} s")
EOF
}

# -----------------------------------------------------------------------------
# Paper preset: Qwen2.5-VL-7B, 2 nodes x 8 H100, the paper's hyperparameters. Every size and location
# below is an environment variable, so the rehearsal (paper_rehearsal) runs these same stage commands
# with small sizes on a CPU; nothing else differs.
paper() {
    local RUN=${RUN:-runs/paper} MODE=${1:-}
    case "$MODE" in ""|--dry-run|--rehearsal) ;; *) echo "unknown argument: $MODE (paper [--dry-run | --rehearsal])" >&2; exit 2 ;; esac
    [ "$MODE" = --rehearsal ] && { paper_rehearsal; return; }
    # where
    local MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
    local HOSTFILE=${HOSTFILE:-hostfile}           # "node1 slots=8\nnode2 slots=8", for GRPO on 2 nodes
    local VIDEOS=${VIDEO_ROOT:-$RUN/videos}         # VideoMind-Dataset's layout (prepare.py videos)
    local DOWNLOAD=${DOWNLOAD:-$([ -n "${VIDEO_ROOT:-}" ] && echo 0 || echo 1)}  # videos you have: VIDEO_ROOT, no download
    local BENCH=${BENCH:-assets}                    # the benchmarks' annotation files (shipped in assets/)
    # sizes (the paper's)
    local NODES=${NODES:-2} GPUS=${GPUS_PER_NODE:-8} SFT_GPUS=${SFT_GPUS:-8}  # SFT: global batch 8 = one node
    local NFRAMES=${NFRAMES:-64} PIX=${MAX_PIXELS:-100352} MIN_PIX=${MIN_PIXELS:-3136}  # 64 frames, 128*28*28 px
    local SFT_BATCH=${SFT_BATCH:-8} SFT_EPOCHS=${SFT_EPOCHS:-1} SFT_LR=${SFT_LR:-1e-6}
    local PROMPTS=${GRPO_PROMPTS:-128} GROUP=${GROUP_SIZE:-8} STEPS=${GRPO_STEPS:-600} GRPO_LR=${GRPO_LR:-1e-6}
    local NEW=${MAX_NEW_TOKENS:-2048} SAVE_EVERY=${SAVE_EVERY:-50} PRECISION=${PRECISION:---bf16}
    local EVAL_MODELS=${EVAL_MODELS:-base sft grpo} PORT=${MASTER_PORT:-29500}
    local BENCHMARKS=${BENCHMARKS:-charades_sta nextgqa rextime}  # evaluated on each (a subset: e.g. charades_sta)
    local VIDEO="--nframes $NFRAMES --max-pixels $PIX --min-pixels $MIN_PIX"
    local SFT_LAUNCH="deepspeed --num_nodes 1 --num_gpus $SFT_GPUS --master_port $PORT"
    local RL_LAUNCH="deepspeed --num_nodes $NODES --num_gpus $GPUS --master_port $PORT"
    [ -f "$HOSTFILE" ] && RL_LAUNCH="deepspeed --hostfile $HOSTFILE --num_nodes $NODES --num_gpus $GPUS --master_port $PORT"
    # sft_cmd OUT DATA / grpo_cmd OUT MODEL DATA: the one SFT and the one GRPO command; the ablation rows
    # (ABLATIONS=1) are the same commands with another start or other data, as in the tiny preset.
    sft_cmd() { echo "sft.py --model $RUN/base_model --data $2 --out $1 --epochs $SFT_EPOCHS \
        --lr $SFT_LR --batch-size $SFT_BATCH --micro-batch 1 --zero-stage 3 --grad-ckpt $PRECISION --no-cache-videos \
        $VIDEO --skip-bad --resume ${SFT_ARGS:-}" | tr -s ' '; }
    grpo_cmd() { echo "grpo.py --model $2 --data $3 --out $1 --group-size $GROUP \
        --prompts-per-step $PROMPTS --steps $STEPS --lr $GRPO_LR --beta 0 --max-new-tokens $NEW --temperature 1.0 \
        --zero-stage 3 --grad-ckpt --gather-for-rollout $PRECISION --no-cache-videos $VIDEO --save-every $SAVE_EVERY --skip-bad --resume \
        ${GRPO_ARGS:-}" | tr -s ' '; }
    local SFT GRPO ABLATIONS=${ABLATIONS:-0}
    SFT=$(sft_cmd "$RUN/sft" "$RUN/data/coldstart.jsonl")
    GRPO=$(grpo_cmd "$RUN/grpo" "$RUN/sft/model" "$RUN/data/rl.jsonl")
    # The paper's Tables 3 and 4 (ABLATIONS=1): R1-U (SFT on every teacher answer, then GRPO), GRPO on
    # the unfiltered RL data, R1-Zero (GRPO from the base) on both. The unfiltered sets exist only when
    # we annotate ourselves (GEMINI_API_KEY): the released files are the filtered ones.
    local ROWS=""
    if [ "$ABLATIONS" = 1 ]; then
        ROWS="zero"
        [ -n "${GEMINI_API_KEY:-}" ] && ROWS="grpo_r1u grpo_rl_unfiltered zero zero_unfiltered"
        if [ -n "${ABLATION_ROWS:-}" ]; then  # a subset: each row is a GRPO run of its own (~48 GPU-hours)
            local r
            for r in $ABLATION_ROWS; do
                [[ " $ROWS " == *" $r "* ]] || { echo "ABLATION_ROWS: '$r' is not one of the rows this run can make: $ROWS" >&2; exit 2; }
            done
            ROWS=$ABLATION_ROWS
        fi
        EVAL_MODELS="$EVAL_MODELS $ROWS"
    fi
    row_cmds() {  # the ablation rows' commands, in order: "launcher|script args"
        local r
        for r in $ROWS; do
            case $r in
                grpo_r1u) echo "$SFT_LAUNCH|$(sft_cmd "$RUN/sft_unfiltered" "$RUN/data/coldstart_unfiltered.jsonl")"
                          echo "$RL_LAUNCH|$(grpo_cmd "$RUN/grpo_r1u" "$RUN/sft_unfiltered/model" "$RUN/data/rl.jsonl")" ;;
                grpo_rl_unfiltered) echo "$RL_LAUNCH|$(grpo_cmd "$RUN/grpo_rl_unfiltered" "$RUN/sft/model" "$RUN/data/rl_unfiltered.jsonl")" ;;
                zero) echo "$RL_LAUNCH|$(grpo_cmd "$RUN/zero" "$RUN/base_model" "$RUN/data/rl.jsonl")" ;;
                zero_unfiltered) echo "$RL_LAUNCH|$(grpo_cmd "$RUN/zero_unfiltered" "$RUN/base_model" "$RUN/data/rl_unfiltered.jsonl")" ;;
            esac
        done
    }
    if [ "$MODE" = --dry-run ]; then
        echo "== dry run: no GPU, no download. Checking what can be checked and printing the plan."
        # Every stage's command line parses and its batch arithmetic holds for the ranks it runs on.
        run python $SFT --dry-run --world-size $SFT_GPUS
        run python $GRPO --dry-run --world-size $((NODES * GPUS))
        run python eval.py --help >/dev/null
        run python prepare.py --help >/dev/null
        run python plan.py
        echo
        echo "== the plan (bash run.sh paper on the first node of $HOSTFILE):"
        echo "   1. prepare.py get $MODEL -> $RUN/base_model; RuizheChen/TVG_processed_data -> $RUN/hf"
        echo "   2. prepare.py videos --root $VIDEOS (only the archives the recipe reads; --list prints their sizes)"
        echo "   3. data.py convert the cold-start and RL files (or annotate with Gemini when GEMINI_API_KEY is set);"
        echo "      prepare.py check: every video decodes at the training setting"
        echo "   4. $SFT_LAUNCH $SFT"
        echo "   5. $RL_LAUNCH $GRPO"
        local cmd
        while IFS= read -r cmd; do echo "   5b. ${cmd%%|*} ${cmd#*|}"; done < <(row_cmds)
        [ "$ABLATIONS" = 1 ] && [ -z "${GEMINI_API_KEY:-}" ] && echo "   (ABLATIONS=1 without GEMINI_API_KEY: R1-Zero only; R1-U and the unfiltered RL row need our own annotation)"
        echo "   6. torchrun --nproc_per_node $GPUS eval.py: $EVAL_MODELS on $BENCHMARKS"
        return
    fi
    [ "${REHEARSAL:-0}" = 1 ] || has_gpu || { echo "the paper preset needs GPUs (try 'bash run.sh paper --dry-run' or 'bash run.sh paper --rehearsal')" >&2; exit 2; }
    mkdir -p "$RUN/data"
    local t0=$SECONDS

    # 1-2. Weights and videos from the hub. Each step skips what it finished before.
    run python prepare.py get --repo "$MODEL" --out "$RUN/base_model"
    [ "$DOWNLOAD" = 1 ] && run python prepare.py videos --root "$VIDEOS" ${PREPARE_ARGS:-}
    # 3. Cold-start and RL sets: our own Gemini annotation when a key is set, else TVG-R1's released files.
    if [ -n "${GEMINI_API_KEY:-}" ]; then
        [ -f "$RUN/data/train.jsonl" ] || run python data.py convert --format tvg_r1 --cot-field none \
            --input "${TRAIN_JSON:?set TRAIN_JSON to the 56K raw annotation JSON}" --video-root "$VIDEOS" --out "$RUN/data/train.jsonl"
        run python annotate.py --data "$RUN/data/train.jsonl" --teacher gemini --out "$RUN/data/annotate" --concurrency 16 \
            ${ANNOTATE_ARGS:-}
        local f
        for f in coldstart rl coldstart_unfiltered rl_unfiltered; do  # the unfiltered ones: ABLATIONS=1
            cp "$RUN/data/annotate/$f.jsonl" "$RUN/data/${f}_all.jsonl"
        done
    else
        run python prepare.py get --repo RuizheChen/TVG_processed_data --repo-type dataset --out "$RUN/hf"
        local rl_json=${RL_JSON:-$(ls "$RUN"/hf/*[Rr][Ll]*.json | head -n1)}
        local cold_json=${COLDSTART_JSON:-$(ls "$RUN"/hf/*[Cc]old*.json | head -n1)}
        [ -f "$RUN/data/rl_all.jsonl" ] || run python data.py convert --format tvg_r1 --input "$rl_json" \
            --video-root "$VIDEOS" --cot-field none --out "$RUN/data/rl_all.jsonl"
        [ -f "$RUN/data/coldstart_all.jsonl" ] || run python data.py convert --format tvg_r1 --input "$cold_json" \
            --video-root "$VIDEOS" --require-cot ${COT_FIELD:+--cot-field $COT_FIELD} --out "$RUN/data/coldstart_all.jsonl"
    fi
    # Every video decodes at the training setting, before a GPU-hour is spent (DROP_BAD=1: leave bad ones out).
    # One call for every set: a video is decoded once, however many samples and sets use it.
    local split todo=() outs=()
    for split in coldstart rl $([ "$ABLATIONS" = 1 ] && [ -n "${GEMINI_API_KEY:-}" ] && echo coldstart_unfiltered rl_unfiltered); do
        [ -f "$RUN/data/$split.jsonl" ] || { todo+=("$RUN/data/${split}_all.jsonl"); outs+=("$RUN/data/$split.jsonl"); }
    done
    [ ${#todo[@]} = 0 ] || run python prepare.py check --data "${todo[@]}" --out "${outs[@]}" $VIDEO \
        $([ "${DROP_BAD:-0}" = 1 ] && echo --drop-bad)

    # 4-5. SFT on one node, GRPO on all of them (a finished stage returns at once: --resume). Every video
    #      passed the check; one that fails mid-run anyway (a disk error) is replaced, logged and counted
    #      (--skip-bad) rather than costing the run.
    run $SFT_LAUNCH $SFT
    run $RL_LAUNCH $GRPO
    local cmd
    while IFS= read -r cmd; do run ${cmd%%|*} ${cmd#*|}; done < <(row_cmds)  # ABLATIONS=1

    # 6. The three benchmarks, the paper's setting (64 frames, 128*28*28 px, greedy, 2048 new tokens)
    local fmt name file extra model_dir
    for name in $EVAL_MODELS; do
        case $name in base) model_dir=$RUN/base_model ;;
                      sft|grpo|grpo_r1u|grpo_rl_unfiltered|zero|zero_unfiltered) model_dir=$RUN/$name/model ;;
                      *) echo "unknown EVAL_MODELS entry: $name (base, sft, grpo, or an ABLATIONS=1 row)" >&2; exit 2 ;; esac
        for fmt in $BENCHMARKS; do
            case $fmt in
                charades_sta) file=$BENCH/charades_sta/charades_sta_test.txt
                              extra="--video-root $VIDEOS/charades_sta/videos_3fps_480_noaudio --durations $VIDEOS/charades_sta/durations.json" ;;
                nextgqa) file=$BENCH/nextgqa/test.csv; extra="--video-root $VIDEOS/nextqa/videos" ;;
                rextime) file=$BENCH/rextime/rextime_val.jsonl; extra="--video-root $VIDEOS" ;;
                *) echo "unknown BENCHMARKS entry: $fmt (charades_sta, nextgqa, rextime)" >&2; exit 2 ;;
            esac
            [ -f "$RUN/eval/$name/$fmt/metrics.json" ] || run torchrun --nproc_per_node $GPUS --master_port $PORT \
                eval.py --model "$model_dir" --format $fmt --data "$file" $extra --out "$RUN/eval/$name/$fmt" $VIDEO \
                --max-new-tokens $NEW ${EVAL_ARGS:-}
        done
    done
    run python - "$RUN" $((SECONDS - t0)) "$BENCHMARKS" $EVAL_MODELS <<'EOF'
import json, os, sys
run, wall, benchmarks, models = sys.argv[1], float(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
names = {f: label for f, label in (("charades_sta", "Charades-STA"), ("nextgqa", "NExT-GQA"), ("rextime", "ReXTime"))
         if f in benchmarks}
keys = ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")
res = {}
print(f"\nPaper preset ({run}/eval), percent, the paper's scorer (eval.py --parse official):")
print(f"{'benchmark':<14}{'model':<20}{'n':>6}" + "".join(f"{k:>9}" for k in keys))
sys.path.insert(0, ".")
import eval as ev
for fmt, label in names.items():
    for m in models:
        r = json.load(open(f"{run}/eval/{m}/{fmt}/metrics.json"))["overall"]
        res.setdefault(fmt, {})[m] = {k: r[k] for k in keys + ("n",)}
        print(f"{label:<14}{m:<20}{r['n']:>6}" + "".join(f"{r[k]:>9.2f}" for k in keys))
        if fmt == "charades_sta":  # the released scorer's first rule (numbers anywhere, <think> included)
            old = ev.score_predictions(ev.read_predictions(f"{run}/eval/{m}/{fmt}/predictions.jsonl"),
                                       "official-0724")["overall"]
            res[fmt][m + "_official-0724"] = {k: old[k] for k in keys + ("n",)}
            if any(old[k] != r[k] for k in keys):
                print(f"{label + '*':<14}{m:<20}{old['n']:>6}" + "".join(f"{old[k]:>9.2f}" for k in keys))
print("* Charades-STA scored with the released scorer's first rule (b261460: the first two numbers anywhere,\n"
      "  <think> included), where it differs from its current one (c818166: the first <time> block first).\n"
      "  Which of the two produced the paper's table we cannot tell.")
res["wall_seconds"] = wall
tmp = f"{run}/results.json.tmp"
json.dump(res, open(tmp, "w"), indent=2)
os.replace(tmp, f"{run}/results.json")
print(f"\nwrote {run}/results.json; wall time {wall:.0f} s")
EOF
}

# The paper preset on a CPU: a miniature of the released world served by a local stand-in for the hub
# (rehearsal.py), then paper() itself with only sizes and locations overridden. What it cannot show:
# CUDA (NCCL, bf16, memory), and a 2-node launch (deepspeed's --hostfile needs ssh between nodes).
paper_rehearsal() {
    local DIR=${REHEARSAL_DIR:-$(mktemp -d -t vtg-rehearsal.XXXXXX)}
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    echo "== rehearsal of 'bash run.sh paper' on the CPU in $DIR"
    run python rehearsal.py build --out "$DIR/world"
    rm -f "$DIR/hub.port"
    python rehearsal.py serve --root "$DIR/world/hub" --port-file "$DIR/hub.port" --teacher "$DIR/world/teacher.json" \
        > "$DIR/hub.log" 2>&1 &
    local hub_pid=$!
    trap "kill $hub_pid 2>/dev/null || true" EXIT
    local i
    for i in $(seq 100); do [ -f "$DIR/hub.port" ] && break; sleep 0.1; done
    [ -f "$DIR/hub.port" ] || { echo "the hub stand-in did not start: $(cat "$DIR/hub.log")" >&2; exit 1; }
    local hub=http://127.0.0.1:$(cat "$DIR/hub.port") port
    port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    echo "   hub stand-in at $hub (its Qwen/Qwen2.5-VL-7B-Instruct is a tiny random model)"
    # ABLATIONS=1 needs our own annotation: the same server stands in for Gemini (a fake key, its URL).
    # Otherwise the released files, whatever key the environment holds.
    if [ "${ABLATIONS:-0}" = 1 ]; then
        export GEMINI_API_KEY=rehearsal TRAIN_JSON="$DIR/world/train_raw.json"
        export ANNOTATE_ARGS="--base-url $hub --nframes 8 --max-pixels 3136 --min-pixels 3136"
        echo "   ABLATIONS=1: annotated by a Gemini stand-in at $hub (its answers: $DIR/world/teacher.json)"
    else
        unset GEMINI_API_KEY GOOGLE_API_KEY
    fi
    # Sizes and locations only; every stage command is paper()'s.
    HF_ENDPOINT=$hub HF_HUB_DISABLE_TELEMETRY=1 DS_ACCELERATOR=cpu REHEARSAL=1 \
    RUN=$DIR/run VIDEO_ROOT= DOWNLOAD=1 BENCH=$DIR/world/bench HOSTFILE=$DIR/no-hostfile NODES=1 GPUS_PER_NODE=2 \
    SFT_GPUS=2 NFRAMES=8 MAX_PIXELS=3136 MIN_PIXELS=3136 SFT_BATCH=2 GRPO_PROMPTS=2 GROUP_SIZE=2 GRPO_STEPS=2 \
    MAX_NEW_TOKENS=24 SAVE_EVERY=1 PRECISION=--no-bf16 MASTER_PORT=$port EVAL_ARGS="--batch-size 4" \
        paper
    echo "== rehearsal done: every stage of 'bash run.sh paper' ran on the CPU in $DIR (hub requests: $DIR/world/requests.jsonl)"
}

setup
case "${1:-}" in
    test) shift; run python -m pytest -q tests "$@" ;;
    tiny) shift; tiny "$@" ;;
    taro) shift; tiny --taro "$@" ;;
    ablations) shift; tiny --ablations "$@" ;;
    paper) shift; paper "$@" ;;
    gpu-check) shift; run python gpu_check.py "$@" ;;
    "") if has_gpu; then paper; else tiny; fi ;;
    *) echo "usage: bash run.sh [tiny [--fresh] | taro [--fresh] | ablations | paper [--dry-run | --rehearsal] | gpu-check | test [pytest args]]" >&2; exit 2 ;;
esac
