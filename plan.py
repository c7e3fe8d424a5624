"""The paper preset's plan, computed on a CPU with no download: parameters, ZeRO-3 memory, activations,
and the time of one GRPO step. `bash run.sh paper --dry-run` prints it.

    python plan.py                                     # Qwen2.5-VL-7B, 2 nodes x 8 H100, the paper's GRPO
    python plan.py --nodes 1 --mfu 0.3 --response 800  # other assumptions

The model is built on the meta device from assets/qwen2_5_vl_7b_config.json (the public
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
ap.add_argument("--config", default=os.path.join(HERE, "assets", "qwen2_5_vl_7b_config.json"),
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
ap.add_argument("--update-ratio", type=float, default=3.8,
                help="time of the update with G prompt copies / packed (bench.py's measured `update speedup`)")
ap.add_argument("--gather-ms", type=float, default=450,
                help="ZeRO-3 re-gathering the weights for every generated token (no --gather-for-rollout): "
                     "ms per token (STACK.md measured 0.3-0.6 s/token for the 7B on 16 GPUs)")
ap.add_argument("--update-chunk", type=int, default=0, help="grpo.py --update-chunk: completions per packed "
                "forward (0: the whole group)")
ap.add_argument("--logit-chunk", type=int, default=4096, help="positions per lm_head call (model.LOGIT_CHUNK)")
ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line at the end")
a = ap.parse_args()
figures = {}

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
# Activations, bf16, activation checkpointing on, the attention kernels never materialising S x S:
#   layer inputs kept for recompute   L * S * h * 2 bytes
#   one layer recomputed at a time    S * (16 h + 3 intermediate) * 2 bytes (q,k,v,o, norms, MLP)
#   vision tower (checkpointed too)   depth * P * hv * 2 + P * (16 hv + 3 iv) * 2
#   logits                            `logits` bytes, below
def activations(seq: int, logits: float) -> float:
    lm = L * seq * h * 2 + seq * (16 * h + 3 * inter) * 2
    vis = vc.depth * vision_patches * vc.hidden_size * 2 + vision_patches * (16 * vc.hidden_size
                                                                             + 3 * vc.intermediate_size) * 2
    return lm + vis + logits


# The GRPO update as grpo.py runs it: ONE packed row per group, [prompt; c_1 ... c_k] with k = G (or
# --update-chunk) answers of up to --max-response tokens, so S = prompt + k * max_response. Its logits
# never exist whole: lm_head and the log-softmax run over --logit-chunk positions at a time under
# checkpointing (model.token_logprobs), ~3 float32 (chunk, V) tensors live at once (logits, log-softmax,
# the entropy's exp), plus the (N, h) predicting states. The completions' attention reads the prompt's
# keys and values once per completion: k copies, one layer at a time (K and V, bf16).
# SFT (sft.py): one sequence of prompt + CoT, logits only at the ~1,024 labelled positions, float32,
# ~3 copies (logits, log-softmax, gradient).
k = a.update_chunk or a.group
seq_grpo = prompt + k * a.max_response
kv_copies = 2 * k * prompt * h * 2  # K and V expanded to every query head (GQA repeated)
logits_grpo = 3 * a.logit_chunk * V * 4 + k * a.max_response * h * 2 + kv_copies
act_grpo = activations(seq_grpo, logits_grpo)
act_sft = activations(prompt + 1024, 1024 * V * 4 * 3)
# SFT runs on ONE node: its global batch of 8 cannot be split over 16 ranks.
_, gpu_states_sft, _ = estimate_zero3_model_states_mem_needs(n_total, largest, a.gpus_per_node, 1,
                                                            cpu_offload=False, cpu_offload_params=False)
print(f"== memory per GPU with ZeRO-3, no offload (model states from DeepSpeed's estimator)")
for name, states, act in ((f"GRPO update on {world} GPUs: a packed row of {seq_grpo:,} tokens", gpu_states, act_grpo),
                          (f"SFT on {a.gpus_per_node} GPUs, 1024-token CoT", gpu_states_sft, act_sft)):
    total = states / GiB + act / GiB
    ok = "fits" if total < a.gpu_gib * 0.9 else "DOES NOT FIT"
    print(f"   {name:52s} states {states / GiB:.1f} GiB + activations ~{act / GiB:.1f} GiB"
          f" = ~{total:.1f} GiB of {a.gpu_gib:.0f} ({ok})")
print(f"   (GRPO activations: layer inputs {L * seq_grpo * h * 2 / GiB:.1f} GiB, one layer's recompute "
      f"{seq_grpo * (16 * h + 3 * inter) * 2 / GiB:.1f}, logit chunks {3 * a.logit_chunk * V * 4 / GiB:.1f}, "
      f"prompt K/V copies {kv_copies / GiB:.2f}; gpu_check.py measures it on one GPU)")
figures.update(grpo_states_gib=gpu_states / GiB, grpo_activations_gib=act_grpo / GiB,
               sft_states_gib=gpu_states_sft / GiB, sft_activations_gib=act_sft / GiB, grpo_update_tokens=seq_grpo)

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
# The update above runs the prompt G times. The packed update (grpo.py's default) runs it once per group:
# its time is train's / --update-ratio, measured by bench.py at the 7B's proportions on a CPU. The
# ideal, from the linear layers' FLOPs alone: G (prompt + response) / (prompt + G response).
ideal = a.group * (prompt + a.response) / (prompt + a.group * a.response)
peak = world * a.gpu_tflops * 1e12
per_rank = completions // world
t_compute = (vision_fwd + prefill + decode + train / a.update_ratio) / (peak * a.mfu)
t_decode = a.response * a.decode_ms / 1000 * max(1, per_rank / 64)
# Without --gather-for-rollout, ZeRO-3 gathers every layer's weights again for each generated token.
t_decode_regather = a.response * (a.decode_ms + a.gather_ms) / 1000 * max(1, per_rank / 64)
print(f"== one GRPO step: {a.prompts} prompts x {a.group} = {completions} completions, {per_rank} per rank")
print(f"   FLOPs: vision {vision_fwd / 1e15:.1f} + prefill {prefill / 1e15:.1f} + decode {decode / 1e15:.1f}"
      f" + update {train / 1e15:.1f} = {flops / 1e15:.0f} PFLOP with the prompt G times in the update (naive,"
      f" re-encoding and re-prefilling per sample: {naive / 1e15:.0f})")
print(f"   packed update: {train / 1e15:.1f} / {a.update_ratio} (measured, bench.py; ideal {ideal:.1f}) ="
      f" {train / a.update_ratio / 1e15:.1f} PFLOP-equivalent")
print(f"   at {a.mfu:.0%} MFU on {world} x {a.gpu_tflops:.0f} TFLOP/s: {t_compute:.0f} s of compute"
      f" + ~{t_decode:.0f} s of memory-bound decoding ({a.response} tokens x {a.decode_ms} ms)"
      f" = ~{t_compute + t_decode:.0f} s/step")
print(f"   decoding without --gather-for-rollout (the weights gathered again per token, ~{a.gather_ms:.0f} ms):"
      f" ~{t_decode_regather:.0f} s/step instead of ~{t_decode:.0f}")
steps = 600
print(f"   600 steps: ~{steps * (t_compute + t_decode) / 3600:.1f} h wall, "
      f"~{steps * (t_compute + t_decode) * world / 3600:.0f} GPU-hours "
      f"(~{steps * (t_compute + t_decode_regather) * world / 3600:.0f} without --gather-for-rollout)")
figures.update(step_seconds=t_compute + t_decode, step_seconds_regather=t_compute + t_decode_regather,
               gpu_hours=steps * (t_compute + t_decode) * world / 3600)
if a.json:
    import json
    print(json.dumps(figures))
