"""Benchmark: one GRPO step done the naive way and our way, on a model where the video matters.

    python bench.py      # 12M-parameter Qwen2.5-VL, 512 video tokens, G = 8 x 64 new tokens: ~25 s on 1 core
    python bench.py --threads 0 --repeats 3                  # torch's default threads, best of 3

Naive (what several peer recipes do): the prompt is copied G times, so the video's pixels are repeated
G times; `generate` runs the vision encoder and the prompt prefill for every copy, and the training
forward encodes the video again for each of the G sequences.

Ours (grpo.py): the video is encoded and the prompt prefilled ONCE per prompt, the KV cache is repeated
for the G samples (`grpo.generate_shared`); the training forward encodes the video once, with
gradient, and reuses the features for the G sequences (`grpo.sequence_logprobs`).

Both run the same step: sample G answers (same seed), then the GRPO loss (mu = 1, entropy bonus 1e-3)
forward + backward on the same answers with the same advantages. The model is random, so every real
reward would be 0: the advantages are fixed random numbers. We check that the two give the same
samples, log-probs, loss and gradients, print both times, and end with `speedup: X.XXx` (naive / ours).

Measured on the 2-core development machine (1 thread): naive 10.56 s (rollout 3.52 s, loss 7.04 s),
ours 3.81 s (rollout 1.08 s, loss 2.74 s), speedup: 2.77x. The rest of a real step (optimizer, reward)
is the same in both.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import data
import grpo
import model as M


def naive_rollout(model, processor, sample, video, G: int, gen_kwargs: dict, vkw: dict):
    """G copies of the prompt (pixels repeated G times), one plain `generate`: -> (batch, (G, Lc) new ids)."""
    batch = data.build_inputs(processor, [sample] * G, [video] * G, **vkw)
    seqs = model.generate(**batch, **gen_kwargs)
    return batch, seqs[:, batch["input_ids"].shape[1]:]


def naive_logprobs(model, batch, ids, mask, temperature: float, with_entropy: bool = False):
    """Per-token log-probs (G, Lc) with the G-copies batch: the vision encoder runs on every copy.
    With `with_entropy`, returns (log-probs, per-token entropy)."""
    G, Lc = ids.shape
    out = model(input_ids=torch.cat([batch["input_ids"], ids], 1),
                attention_mask=torch.cat([batch["attention_mask"], mask.long()], 1),
                mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids)], 1),
                pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"],
                second_per_grid_ts=batch["second_per_grid_ts"], logits_to_keep=Lc + 1, use_cache=False)
    logp_all = (out.logits[:, :-1].float() / temperature).log_softmax(-1)
    logp = logp_all.gather(-1, ids[..., None]).squeeze(-1)
    return (logp, -(logp_all.exp() * logp_all).sum(-1)) if with_entropy else logp


def gen_kwargs_for(model, processor, new_tokens: int, temperature: float = 1.0) -> dict:
    """grpo.py's sampling settings, with a fixed length so both paths decode the same number of steps."""
    kw = grpo.sampling_kwargs(model, processor.tokenizer, temperature, new_tokens)
    return dict(kw, min_new_tokens=new_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description="Time one GRPO step, naive vs shared video / prefill (grpo.py).")
    ap.add_argument("--hidden", type=int, default=384, help="language model width")
    ap.add_argument("--layers", type=int, default=4, help="language model depth")
    ap.add_argument("--vision-hidden", type=int, default=256, help="vision tower width")
    ap.add_argument("--vision-depth", type=int, default=4, help="vision tower depth")
    ap.add_argument("--frames", type=int, default=64, help="frames per video (112x112: 16 video tokens per 2 frames)")
    ap.add_argument("--group-size", type=int, default=8, help="G: samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per answer (fixed length)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (the same for both paths)")
    ap.add_argument("--repeats", type=int, default=1, help="time each path this many times, keep the fastest")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default). 1 by default: "
                    "on a shared 2-core machine oversubscribed OpenMP threads make timings swing 10x")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    G = a.group_size
    side = data.SYNTH_SIZE  # 112 px: (112/28)^2 = 16 merged tokens per temporal patch of 2 frames
    vkw = dict(nframes=a.frames, max_pixels=side * side, min_pixels=side * side)

    with tempfile.TemporaryDirectory() as tmp:
        M.build_tiny(os.path.join(tmp, "m"), hidden=a.hidden, layers=a.layers, heads=max(2, a.hidden // 64),
                     vision_hidden=a.vision_hidden, vision_depth=a.vision_depth)
        data.synth(os.path.join(tmp, "d"), n_train=4, n_test=0, seed=0)
        samples = data.read_jsonl(os.path.join(tmp, "d", "train.jsonl"))
        sample = max(samples, key=lambda s: s.duration)  # the longest video: all --frames are sampled
        policy, processor = M.load_model(os.path.join(tmp, "m")), M.load_processor(os.path.join(tmp, "m"))
        video = data.load_video(sample, **vkw)
        batch1 = data.build_inputs(processor, [sample], [video], **vkw)
        n_video = int((batch1["input_ids"] == policy.config.video_token_id).sum())
        print(f"model: {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters; prompt "
              f"{batch1['input_ids'].shape[1]} tokens of which {n_video} video tokens ({a.frames} frames); "
              f"G = {G} x {a.new_tokens} new tokens; {torch.get_num_threads()} CPU threads")
        gen = gen_kwargs_for(policy, processor, a.new_tokens)
        adv = grpo.group_advantages(torch.randn(1, G, generator=torch.Generator().manual_seed(1)))[0].float()

        def step(naive: bool, ids=None, gen=gen):
            """One GRPO step -> (seconds rollout, seconds update, CPU seconds, new ids, log-probs, loss, grads)."""
            policy.zero_grad(set_to_none=True)
            torch.manual_seed(a.seed)
            t0, c0 = time.time(), time.process_time()
            with torch.no_grad():
                if naive:
                    batch, new = naive_rollout(policy, processor, sample, video, G, gen, vkw)
                else:
                    new = grpo.generate_shared(policy, data.build_inputs(processor, [sample], [video], **vkw), G, gen)
            t1 = time.time()
            ids = new if ids is None else ids  # the update runs on the same answers in both paths
            tok = processor.tokenizer
            mask = grpo.completion_mask(ids, grpo.stop_ids(policy, tok), tok.pad_token_id)
            if naive:
                logp, ent = naive_logprobs(policy, batch, ids, mask, 1.0, with_entropy=True)
            else:
                logp, ent = grpo.sequence_logprobs(policy, grpo.prompt_inputs(batch1, 0), ids, mask, 1.0,
                                                   with_entropy=True)
            # mu = 1 (pi_old = pi) and the authors' entropy bonus 1e-3, so the loss depends on the model
            loss, _ = grpo.grpo_loss(logp, logp.detach(), adv[:, None], mask, entropy=ent, entropy_coef=1e-3)
            loss.backward()
            t2 = time.time()
            grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
            return t1 - t0, t2 - t1, time.process_time() - c0, new, logp.detach(), loss.item(), grads

        step(False, gen=gen_kwargs_for(policy, processor, 4))  # warm-up: lazy imports, allocator
        naive, ours = [], []
        for _ in range(a.repeats):  # alternate, so a busy machine slows both alike
            naive.append(step(True))
            ours.append(step(False, ids=naive[-1][3]))
        n_roll, n_upd, n_cpu, n_new, n_logp, n_loss, n_grad = min(naive, key=lambda r: r[0] + r[1])
        o_roll, o_upd, o_cpu, o_new, o_logp, o_loss, o_grad = min(ours, key=lambda r: r[0] + r[1])
        for name, (roll, upd, cpu) in (("naive", (n_roll, n_upd, n_cpu)), ("ours ", (o_roll, o_upd, o_cpu))):
            print(f"{name}: {roll + upd:6.2f} s  (rollout {roll:.2f} s, loss forward+backward {upd:.2f} s; "
                  f"CPU time {cpu:.1f} s)")
        rel = ((n_grad - o_grad).norm() / n_grad.norm()).item()
        print(f"same samples for the same seed: {torch.equal(n_new, o_new)}; max |logp diff| "
              f"{(n_logp - o_logp).abs().max().item():.2e}; loss {n_loss:.6f} vs {o_loss:.6f}; "
              f"gradient relative difference {rel:.2e}")
        assert abs(n_loss - o_loss) < 1e-5 and rel < 1e-3, "the two paths disagree"
        print(f"speedup: {(n_roll + n_upd) / (o_roll + o_upd):.2f}x")


if __name__ == "__main__":
    main()
