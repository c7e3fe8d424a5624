"""The paper preset's plan, computed on a CPU with no download: parameters, ZeRO-3 memory, activations,
and the time of one GRPO step. `bash run.sh paper --dry-run` prints it.

    python plan.py                                     # Qwen2.5-VL-7B, 2 nodes x 8 H100, the paper's GRPO
    python plan.py --nodes 1 --mfu 0.3 --response 800  # other assumptions

The model is built on the meta device from ../shared/data/qwen2_5_vl_7b_config.json (the public
config.json of Qwen/Qwen2.5-VL-7B-Instruct): exact parameter counts, no weights. Memory for the model
states comes from DeepSpeed's own ZeRO-3 estimator. Its `..._all_live` variant is wrong on meta
tensors (it dedupes parameters by data_ptr(), which is 0 on meta), so we call `..._all_cold` with the
exact counts. Activations and FLOPs are estimates from formulas written out below, with every
assumption printed next to the number.
"""
from __future__ import annotations

import argparse
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GiB = 2 ** 30

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--config", default=os.path.join(HERE, "..", "shared", "data", "qwen2_5_vl_7b_config.json"),
                help="model config.json (meta-device build, no weights)")
ap.add_argument("--nodes", type=int, default=2, help="nodes")
ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
ap.add_argument("--gpu-gib", type=float, default=80, help="memory per GPU (H100 80GB)")
ap.add_argument("--gpu-tflops", type=float, default=989, help="dense bf16 TFLOP/s per GPU (H100 SXM)")
ap.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation of the training passes")
ap.add_argument("--frames", type=int, default=64, help="frames per video (paper: 64)")
ap.add_argument("--frame-pixels", type=int, default=128 * 28 * 28, help="pixels per frame (paper: 128*28*28)")
ap.add_argument("--text-tokens", type=int, default=150, help="system prompt + query + template tokens")
ap.add_argument("--response", type=int, default=400, help="assumed MEAN response length for FLOPs (tokens)")
ap.add_argument("--max-response", type=int, default=2048, help="max response length for memory (paper: 2048)")
ap.add_argument("--prompts", type=int, default=128, help="GRPO prompts per step (paper: 128)")
ap.add_argument("--group", type=int, default=8, help="GRPO samples per prompt (paper: 8)")
ap.add_argument("--decode-ms", type=float, default=9.0,
                help="HF generate time per decode step at batch 64 with gathered weights (memory-bound)")
a = ap.parse_args()

# --- parameters -------------------------------------------------------------------------------------
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

cfg = Qwen2_5_VLConfig.from_json_file(a.config)
with torch.device("meta"):
    model = Qwen2_5_VLForConditionalGeneration(cfg)
n_total = sum(p.numel() for p in model.parameters())
n_vision = sum(p.numel() for p in model.model.visual.parameters())
n_embed = model.model.language_model.embed_tokens.weight.numel()
n_head = model.lm_head.weight.numel()
n_lm = n_total - n_vision
largest = max(p.numel() for p in model.parameters())  # the embedding / lm_head matrix
tc, vc = cfg.text_config, cfg.vision_config
L, h, inter, V = tc.num_hidden_layers, tc.hidden_size, tc.intermediate_size, tc.vocab_size
world = a.nodes * a.gpus_per_node
print(f"== Qwen2.5-VL-7B on the meta device ({a.config})")
print(f"   parameters {n_total:,} = language model {n_lm:,} (embed {n_embed:,} + lm_head {n_head:,} untied)"
      f" + vision {n_vision:,}")

# --- tokens -----------------------------------------------------------------------------------------
# Each frame is resized to at most frame_pixels (multiples of 28); 2 frames form a temporal patch and a
# 2x2 merge of 14-px patches becomes one LM token: tokens per frame pair = pixels / 28^2.
patch, merge, tps = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
tokens_per_pair = a.frame_pixels // (patch * merge) ** 2
video_tokens = a.frames // tps * tokens_per_pair
vision_patches = video_tokens * merge ** 2  # what the vision tower processes
prompt = video_tokens + a.text_tokens
print(f"== one sample: {a.frames} frames x {a.frame_pixels} px -> {video_tokens:,} video tokens "
      f"({vision_patches:,} vision patches); prompt ~{prompt:,} tokens, max response {a.max_response}")

# --- memory -----------------------------------------------------------------------------------------
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: E402

# The function `..._all_cold` prints a table for every offload option; this is its no-offload row.
_, gpu_states, _ = estimate_zero3_model_states_mem_needs(n_total, largest, a.gpus_per_node, a.nodes,
                                                        cpu_offload=False, cpu_offload_params=False)
# Activations at micro-batch 1, bf16, activation checkpointing on, SDPA/flash attention (no S^2 term):
#   layer inputs kept for recompute  L * S * h * 2 bytes
#   one layer recomputed at a time   S * (16 h + 3 intermediate) * 2 bytes (q,k,v,o, norms, MLP)
#   logits only where the loss is    R * V * 4 bytes (fp32) x 3 (logits, log-softmax, grad)
#   vision tower (checkpointed too)  depth * P * hv * 2 + P * (16 hv + 3 iv) * 2
def activations(seq: int, loss_tokens: int) -> float:
    lm = L * seq * h * 2 + seq * (16 * h + 3 * inter) * 2
    logits = loss_tokens * V * 4 * 3
    vis = vc.depth * vision_patches * vc.hidden_size * 2 + vision_patches * (16 * vc.hidden_size
                                                                             + 3 * vc.intermediate_size) * 2
    return lm + logits + vis


# SFT runs on ONE node: its global batch of 8 cannot be split over 16 ranks.
_, gpu_states_sft, _ = estimate_zero3_model_states_mem_needs(n_total, largest, a.gpus_per_node, 1,
                                                            cpu_offload=False, cpu_offload_params=False)
act_grpo = activations(prompt + a.max_response, a.max_response)
act_sft = activations(prompt + 1024, 1024)
print(f"== memory per GPU with ZeRO-3, no offload (model states from DeepSpeed's estimator)")
for name, states, act in ((f"GRPO update on {world} GPUs, response 2048", gpu_states, act_grpo),
                          (f"SFT on {a.gpus_per_node} GPUs, 1024-token CoT", gpu_states_sft, act_sft)):
    total = states / GiB + act / GiB
    ok = "fits" if total < a.gpu_gib * 0.9 else "DOES NOT FIT"
    print(f"   {name:38s} states {states / GiB:.1f} GiB + activations ~{act / GiB:.1f} GiB"
          f" = ~{total:.1f} GiB of {a.gpu_gib:.0f} ({ok})")

# --- time of one GRPO step --------------------------------------------------------------------------
# FLOPs: 2 N per token forward, 6 N forward+backward, 8 N with checkpoint recompute; N excludes the
# embedding (a lookup). The video is encoded once per prompt and the prompt prefilled once per group.
n_flop = n_lm - n_embed
completions = a.prompts * a.group
vision_fwd = 2 * n_vision * vision_patches * a.prompts
prefill = 2 * n_flop * prompt * a.prompts
decode = 2 * n_flop * a.response * completions
train = 8 * n_flop * (prompt + a.response) * completions + 8 * n_vision * vision_patches * a.prompts
naive = 2 * n_vision * vision_patches * completions + 2 * n_flop * prompt * completions + decode + train
flops = vision_fwd + prefill + decode + train
peak = world * a.gpu_tflops * 1e12
per_rank = completions // world
t_compute = flops / (peak * a.mfu)
t_decode = a.response * a.decode_ms / 1000 * max(1, per_rank / 64)
print(f"== one GRPO step: {a.prompts} prompts x {a.group} = {completions} completions, {per_rank} per rank")
print(f"   FLOPs: vision {vision_fwd / 1e15:.1f} + prefill {prefill / 1e15:.1f} + decode {decode / 1e15:.1f}"
      f" + update {train / 1e15:.1f} = {flops / 1e15:.0f} PFLOP (naive, re-encoding and re-prefilling per"
      f" sample: {naive / 1e15:.0f})")
print(f"   at {a.mfu:.0%} MFU on {world} x {a.gpu_tflops:.0f} TFLOP/s: {t_compute:.0f} s of compute"
      f" + ~{t_decode:.0f} s of memory-bound decoding ({a.response} tokens x {a.decode_ms} ms)"
      f" = ~{t_compute + t_decode:.0f} s/step")
steps = 600
print(f"   600 steps: ~{steps * (t_compute + t_decode) / 3600:.1f} h wall, "
      f"~{steps * (t_compute + t_decode) * world / 3600:.0f} GPU-hours")
