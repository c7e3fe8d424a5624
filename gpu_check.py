r"""What only a GPU can show, checked in a few minutes on ONE NVIDIA GPU: `bash run.sh gpu-check`.

    bash run.sh gpu-check                      # every check; PASS/FAIL lines; exit 0 when all pass
    python gpu_check.py --only memory rollout  # some of them
    python gpu_check.py --layers 1 2           # the memory check's cut-down decoder depths

The CPU tests run the same code with gloo, float32, tiny shapes and small files; they cannot see:
* nccl-sft, nccl-grpo, nccl-eval: the tiny model in bf16 on CUDA, each stage for a few steps under an
  NCCL process group with ZeRO-3 on 1 rank (torchrun): every collective must hold CUDA tensors (NCCL
  refuses CPU ones; gloo takes both), and bf16 must run end to end. GRPO runs with --gather-for-rollout.
* memory: one GRPO update at the paper's shapes (64 frames x 128*28*28 px = 4,096 video tokens, G = 8
  answers of 2,048 tokens, activation checkpointing, the packed row and the chunked log-probs grpo.py
  uses) on the 7B's config with its decoder cut to a few layers (random bf16 weights, no optimizer).
  It measures the peak memory above the weights and their gradients at each depth, prints the cost
  per decoder layer and its extrapolation to 28 layers beside plan.py's estimate, and passes when
  that plus plan.py's ZeRO-3 model states fits in 90% of the GPU.
* rollout: tokens per second of a ZeRO-3 rollout (G = 8 answers of a paper-size prompt, the cut 7B)
  with and without --gather-for-rollout's gathering: with it the weights are gathered once, without
  it once per generated token. On one GPU the gathers cost no communication, only ZeRO-3's hooks, so
  the ratio here is a lower bound of the one on 16 GPUs. Then, gathered once, the prompt's KV cache
  held once while sampling (grpo.py's attention, model.shared_prefix_attention: plain matmuls in
  float32, no fused kernel) against repeated G times (SDPA): tokens per second and peak memory; it
  passes when the shared cache takes less memory (the speed is reported, not judged: the CPU cannot
  say which side the GPU's kernels favour).

Without CUDA it says that it needs a GPU and exits 2. Its CPU-checkable parts (the arguments, the cut
config, the extrapolation) are tested in tests/test_gpu_paths.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = ("sft", "grpo", "eval", "memory", "rollout")
GiB = 2 ** 30


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the docstring of gpu_check.py.")
    ap.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), help="the checks to run")
    ap.add_argument("--layers", nargs=2, type=int, default=[1, 2], metavar=("L1", "L2"),
                    help="memory: the two cut-down decoder depths measured (their difference is one layer's cost)")
    ap.add_argument("--group-size", type=int, default=8, help="memory and rollout: G answers per prompt")
    ap.add_argument("--answer-tokens", type=int, default=2048, help="memory: tokens per answer (the paper's max)")
    ap.add_argument("--rollout-tokens", type=int, default=128, help="rollout: tokens generated per answer")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory: the GPU's memory the paper run has (H100: 80)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    return ap.parse_args(argv)


def cut_config(layers: int):
    """The Qwen2.5-VL-7B config (assets/) with its decoder cut to `layers` layers; the vision tower whole."""
    from transformers import Qwen2_5_VLConfig
    cfg = Qwen2_5_VLConfig.from_json_file(os.path.join(HERE, "assets", "qwen2_5_vl_7b_config.json"))
    cfg.text_config.num_hidden_layers = layers
    cfg.text_config.max_window_layers = min(cfg.text_config.max_window_layers, layers)
    if getattr(cfg.text_config, "layer_types", None):
        cfg.text_config.layer_types = cfg.text_config.layer_types[:layers]
    return cfg


def extrapolate(peaks: dict[int, float], layers: int) -> tuple[float, float]:
    """Peaks measured at two depths {L: GiB} -> (GiB per layer, GiB at `layers`): a straight line through them."""
    (l1, p1), (l2, p2) = sorted(peaks.items())[:2]
    per = (p2 - p1) / (l2 - l1)
    return per, p1 + (layers - l1) * per


def report(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name:<10} {detail}", flush=True)
    return ok


# -----------------------------------------------------------------------------
# nccl-sft / nccl-grpo / nccl-eval: the real scripts, tiny, bf16, NCCL, ZeRO-3 on 1 rank


def stage_checks(tmp: str, which: list[str]) -> list[bool]:
    import data
    import model
    video = ["--nframes", "16", "--max-pixels", "3136", "--min-pixels", "3136"]
    model.build_tiny(f"{tmp}/base", hidden=128, layers=2, heads=4)
    data.synth(f"{tmp}/data", n_train=8, n_test=2, seed=0)
    py = sys.executable
    env = dict(os.environ, FORCE_QWENVL_VIDEO_READER="decord", TOKENIZERS_PARALLELISM="false")
    subprocess.run([py, "annotate.py", "--data", f"{tmp}/data/train.jsonl", "--teacher", "captions",
                    "--out", f"{tmp}/ann", "--rl-include-coldstart"], cwd=HERE, env=env, check=True, capture_output=True)
    launch = [py, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29511"]
    runs = {
        "sft": [*launch, "sft.py", "--model", f"{tmp}/base", "--data", f"{tmp}/ann/coldstart.jsonl", "--out",
                f"{tmp}/sft", "--max-steps", "3", "--batch-size", "2", "--micro-batch", "1", "--zero-stage", "3",
                "--bf16", "--grad-ckpt", *video],
        "grpo": [*launch, "grpo.py", "--model", f"{tmp}/sft/model", "--data", f"{tmp}/ann/rl.jsonl", "--out",
                 f"{tmp}/grpo", "--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--zero-stage", "3",
                 "--bf16", "--grad-ckpt", "--gather-for-rollout", "--max-new-tokens", "32", *video],
        "eval": [*launch, "eval.py", "--model", f"{tmp}/grpo/model", "--data", f"{tmp}/data/test.jsonl", "--out",
                 f"{tmp}/eval", "--dtype", "bfloat16", "--max-new-tokens", "32", *video],
    }
    results = []
    for name in ("sft", "grpo", "eval"):  # each stage feeds the next
        if name not in which:
            continue
        t = time.time()
        p = subprocess.run(runs[name], cwd=HERE, env=env, capture_output=True, text=True)
        tail = (p.stdout + p.stderr).strip().splitlines()[-3:] if p.returncode else []
        results.append(report(f"nccl-{name}", p.returncode == 0,
                              f"{time.time() - t:.0f} s" + ("".join(f"\n        {ln}" for ln in tail))))
    return results


# -----------------------------------------------------------------------------
# memory and rollout: the cut 7B at the paper's shapes, in this process


def paper_prompt(cfg, device):
    """One paper-size prompt as grpo.prompt_inputs gives it: 64 frames of 448x224 = 128*28*28 px, i.e. 32
    temporal patches x 16 x 32 patches = 4,096 video tokens, wrapped in ~150 text tokens."""
    import torch
    t, h, w = 32, 16, 32  # temporal patches (64 frames / 2), 224 px / 14, 448 px / 14
    n_video = t * h * w // 4  # 2x2 patches merge into one token
    text = torch.randint(1000, 100000, (150,))
    ids = torch.cat([text[:20], torch.tensor([cfg.vision_start_token_id]), torch.full((n_video,), cfg.video_token_id),
                     torch.tensor([cfg.vision_end_token_id]), text[20:]])[None]
    types = (ids == cfg.video_token_id).long() * 2  # 0 text, 2 video
    return {"input_ids": ids.to(device), "mm_token_type_ids": types.to(device),
            "pixel_values_videos": torch.randn(t * h * w, 3 * 2 * 14 * 14, dtype=torch.bfloat16, device=device),
            "video_grid_thw": torch.tensor([[t, h, w]], device=device),
            "second_per_grid_ts": torch.tensor([2.0], device=device)}  # 64 frames at 1 fps


def plan_estimate() -> dict:
    p = subprocess.run([sys.executable, "plan.py", "--json"], cwd=HERE, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def memory_check(a) -> bool:
    import torch
    import grpo
    import model as M
    from transformers import Qwen2_5_VLForConditionalGeneration
    dev, G, C = torch.device("cuda"), a.group_size, a.answer_tokens
    peaks = {}
    for layers in a.layers:
        cfg = cut_config(layers)
        torch.cuda.empty_cache()
        with torch.device(dev):
            m = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)
        M.use_prefix_attention(m)
        m.activation_checkpointing_enable()
        m.train()
        weights = torch.cuda.memory_allocated()
        n_params = sum(p.numel() for p in m.parameters())
        torch.cuda.reset_peak_memory_stats()
        prompt = paper_prompt(cfg, dev)
        ids = torch.randint(1000, 100000, (G, C), device=dev)
        mask = torch.ones(G, C, device=dev)
        logp, ent = M.completion_logprobs(m, prompt, ids, mask, 1.0, with_entropy=True)
        adv = torch.randn(G, 1, device=dev)
        loss, _ = grpo.grpo_loss(logp, logp.detach(), adv, mask, entropy=ent, entropy_coef=1e-3)
        loss.backward()
        torch.cuda.synchronize()
        # Above the weights and their bf16 gradients (ZeRO-3 partitions both: plan.py counts them)
        peaks[layers] = (torch.cuda.max_memory_allocated() - weights - 2 * n_params) / GiB
        print(f"        {layers} decoder layer(s): update peak {peaks[layers]:.2f} GiB above weights and gradients")
        del m, logp, ent, loss
    per, total = extrapolate(peaks, 28)
    plan = plan_estimate()
    fits = total + plan["grpo_states_gib"] < 0.9 * a.gpu_gib
    return report("memory", fits, f"{per:.2f} GiB per decoder layer -> {total:.1f} GiB of activations at 28 layers "
                  f"(plan.py: {plan['grpo_activations_gib']:.1f} GiB) + {plan['grpo_states_gib']:.1f} GiB ZeRO-3 states "
                  f"on 16 GPUs = {total + plan['grpo_states_gib']:.1f} of {a.gpu_gib:.0f} GiB")


def rollout_check(a) -> bool:
    import deepspeed
    import torch
    import grpo
    import model as M
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
    from transformers import Qwen2_5_VLForConditionalGeneration
    M.init_distributed()  # a world of one, NCCL
    cfg = cut_config(4)
    ds = M.ds_config(micro_batch=1, grad_accum=1, zero_stage=3, lr=1e-6, bf16=True)
    with torch.device("cuda"):
        m = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)
    engine, *_ = deepspeed.initialize(model=m, config=ds, model_parameters=m.parameters())
    prompt = paper_prompt(cfg, engine.device)
    batch = {k: v for k, v in prompt.items()}
    batch["attention_mask"] = torch.ones_like(prompt["input_ids"])
    gen = dict(do_sample=True, max_new_tokens=a.rollout_tokens, min_new_tokens=a.rollout_tokens, top_k=0,
               pad_token_id=cfg.text_config.pad_token_id or 0)
    speed = {}
    engine.module.eval()
    for name, ctx in (("per token", None), ("gathered once", unwrap_model_for_generation)):
        torch.cuda.synchronize()
        t = time.time()
        if ctx is None:
            grpo.generate_shared(engine.module, batch, a.group_size, gen)
        else:
            with ctx(engine):
                grpo.generate_shared(engine.module, batch, a.group_size, gen)
        torch.cuda.synchronize()
        speed[name] = a.group_size * a.rollout_tokens / (time.time() - t)
    ratio = speed["gathered once"] / speed["per token"]
    ok = report("rollout", ratio > 1.0, f"{speed['per token']:.0f} tokens/s gathering per token, "
                f"{speed['gathered once']:.0f} gathered once: {ratio:.2f}x (cut 7B, {a.group_size} x "
                f"{a.rollout_tokens} tokens, 1 GPU)")
    # The prompt's cache held once (grpo.py's attention) against repeated G times, both gathered once
    peak = {}
    for name, shared in (("repeated", False), ("held once", True)):
        if shared:
            M.use_prefix_attention(engine.module)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.time()
        with unwrap_model_for_generation(engine):
            grpo.generate_shared(engine.module, batch, a.group_size, gen, shared_decode=shared)
        torch.cuda.synchronize()
        speed[name] = a.group_size * a.rollout_tokens / (time.time() - t)
        peak[name] = torch.cuda.max_memory_allocated()
    return ok & report("rollout cache", peak["held once"] < peak["repeated"],
                       f"prompt cache repeated {a.group_size}x: {speed['repeated']:.0f} tokens/s, peak "
                       f"{peak['repeated'] / GiB:.1f} GiB; held once: {speed['held once']:.0f} tokens/s "
                       f"({speed['held once'] / speed['repeated']:.2f}x), peak "
                       f"{peak['held once'] / GiB:.1f} GiB")


def main(argv=None) -> None:
    a = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu_check.py needs an NVIDIA GPU (CUDA); none is visible here. The CPU-checkable parts are "
              "tests/test_gpu_paths.py; the paper preset's other stages: bash run.sh paper --rehearsal", file=sys.stderr)
        sys.exit(2)
    print(f"gpu_check on {torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / GiB:.0f} GiB)")
    tmp = tempfile.mkdtemp(prefix="gpu_check.")
    results = stage_checks(tmp, a.only)
    if "memory" in a.only:
        results.append(memory_check(a))
    if "rollout" in a.only:
        results.append(rollout_check(a))
    print(f"{sum(results)} of {len(results)} checks passed" + (f"; runs kept in {tmp}" if a.keep else ""))
    if not a.keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
