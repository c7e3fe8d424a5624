"""Benchmark: one GRPO step done the naive way and our way, on a model where the video matters; then
eval.py's answers per query and grouped by video.

    python bench.py      # 8.4M-parameter Qwen2.5-VL, 512 video tokens, G = 8 x 64 new tokens: ~2 minutes on 1 core
    python bench.py --threads 0 --repeats 5                  # torch's default threads, best of 5
    python bench.py --profile                                # + ours' time in kernels vs the rest

Naive (what several peer recipes do): the prompt is copied G times, so the video's pixels are repeated
G times; `generate` runs the vision encoder and the prompt prefill for every copy, and the training
forward encodes the video again for each of the G sequences and runs the prompt G times.

Ours (grpo.py): the video is encoded and the prompt prefilled ONCE per prompt, and its KV cache is held
once while the G samples are drawn (`grpo.generate_shared`: the rollout line compares it with the cache
repeated G times, what it did before); the training forward runs the video and the prompt ONCE per
group, in one packed row [prompt; c_1 ... c_G] (`grpo.sequence_logprobs`, model.py). "Ours, plain
update" is the step before the packed row: the same rollout, the video encoded once in the training
forward, but G rows [prompt; c_i] (grpo.py --update plain).

All three run the same step: sample G answers (same seed), then the GRPO loss (mu = 1, entropy bonus
1e-3) forward + backward on the same answers with the same advantages. The model is random, so every
real reward would be 0: the advantages are fixed random numbers. We check that they give the same
samples, log-probs, loss and gradients, print the times (each part the fastest of --repeats), and:
    speedup: naive / ours with the plain update (what sharing the rollout and the video gives)
    update speedup: the loss forward + backward, G prompt copies / packed (prompt ~10x the answer, G = 8)
    step speedup: naive / ours
    rollout speedup: ours' rollout with the prompt's cache repeated G times / held once
    taro step: a TaRO step at its costliest (grpo.py --taro at step 1: every rollout guided, continuing
               the prompt's one prefill from its caption prefix; the bonus's two no-grad forwards; the
               answers longer by their prefix) / ours
The shape is the 7B's in proportion: the prompt is ~10x an answer, and the vision tower (128 wide, 2
blocks) costs ~0.4 of the prompt's prefill, as the 7B's ViT does on 64 frames (2.2e13 vs 6.0e13 FLOPs);
a heavier tower would make the unshareable video backward dominate the update. Measured on the 2-core
development machine (1 thread), see README.md ("Running a stage by hand"). The rest of a real step
(optimizer, reward) is the same in all three.

Then eval.py's generation with the same weights (greedy, one query per generate call, answers of
--new-tokens tokens, videos decoded inline: every second of work is on the clock) on a file of
--queries-per-video queries about each of --eval-videos videos, answered per query (each query decodes
its video, `generate` encodes it: `eval.py --no-group-videos`) and grouped by video (decoded and
encoded once for all of its queries: eval.py's default; the answers are asserted identical) and
grouped and batched (a video's queries in one generate call, the prompt they share prefilled once:
eval.py --batch-size Q; not bit-identical, the agreement is printed):
    eval speedup: per query / grouped and batched
    eval speedup, bit-identical: per query / grouped
Last, sft.py's cold-start step at the tiny preset's shapes with --freeze-vision (sft_part):
    sft step speedup: the decoded frames kept, the processor's pixel work and the frozen tower each step /
                      the tower's outputs kept (sft.VisionCache)
"""
from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import torch

import data
import eval as ev
import grpo
import model as M
import predict


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


def time_eval(model, processor, queries: list, gen_kwargs: dict, vkw: dict, group_videos: bool, batch_size: int = 1):
    """eval.py's generation loop over `queries` (`ev.by_video` order), `batch_size` queries per generate
    call and no decoding ahead -> (seconds, responses)."""
    t0 = time.time()
    texts = [t for _, batch in ev.answer_batches(model, processor, queries, gen_kwargs, batch_size, group_videos, 0,
                                                 **vkw) for t in batch]
    return time.time() - t0, texts


def gen_kwargs_for(model, processor, new_tokens: int, temperature: float = 1.0) -> dict:
    """grpo.py's sampling settings, with a fixed length so both paths decode the same number of steps."""
    kw = grpo.sampling_kwargs(model, processor.tokenizer, temperature, new_tokens)
    return dict(kw, min_new_tokens=new_tokens)


def taro_step(policy, processor, sample, video, G: int, gen: dict, adv, vkw: dict) -> float:
    """Seconds of one TaRO step as grpo.py --taro runs it at step 1 (p = 1): G guided rollouts, the
    temporal drops (V and the shuffled V'), the update with the guided rows' loss."""
    tok = processor.tokenizer
    policy.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    t0 = time.time()
    batch = data.build_inputs(processor, [sample], [video], **vkw)  # once, as grpo.py: rollout and update
    prompt = grpo.prompt_inputs(batch, 0)
    draw = torch.Generator().manual_seed(0)
    prefixes = [tok.encode(data.guided_prefix(sample.query, sample.captions, draw), add_special_tokens=False)
                for _ in range(G)]
    ids = M.generate_from_prefixes(policy, batch, G, prefixes, gen, tok.pad_token_id,
                                   max_len=max(map(len, prefixes)) + gen["max_new_tokens"])
    mask = grpo.completion_mask(ids, grpo.stop_ids(policy, tok), tok.pad_token_id)
    logprobs = functools.partial(grpo.sequence_logprobs, temperature=1.0, packed=True)
    args = argparse.Namespace(tsr_radius=3.0)
    grpo.temporal_drops(policy, processor, sample, video, prompt, ids, mask, [slice(0, G)], logprobs, args,
                        torch.Generator().manual_seed(1), vkw)
    logp, ent = grpo.sequence_logprobs(policy, prompt, ids, mask, 1.0, with_entropy=True)
    guided = torch.ones(G, dtype=torch.bool)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), grpo.guided_advantages(adv, guided)[:, None], mask, entropy=ent,
                             entropy_coef=1e-3, guided=guided)
    loss.backward()
    return time.time() - t0


def sft_part(tmp: str, batch: int, repeats: int) -> None:
    """sft.py's step with --freeze-vision at the tiny preset's shapes (run.sh: a 0.8M model, 16 frames of
    56x56, a batch of 32 answers written by annotate.py's caption teacher, each from another video),
    three ways: every video decoded each step (--no-cache-videos), the decoded frames kept (sft.py
    before the vision cache: the processor's pixel work and the frozen tower each step), the tower's
    outputs kept (sft.VisionCache: neither). Each is the inputs and the loss forward + backward; the
    optimizer step is the same in all three."""
    import annotate
    import sft
    M.build_tiny(os.path.join(tmp, "tiny"), hidden=128, layers=2, heads=4, vision_hidden=64, vision_depth=2)
    data.synth(os.path.join(tmp, "sft"), n_train=batch, n_test=0, seed=2)
    samples = data.read_jsonl(os.path.join(tmp, "sft", "train.jsonl"))[::3]  # one query per video
    exs = [sft.Example(s, f"bench:{i}", annotate.caption_answer(s, 0.0, 0))
           for i, s in enumerate(samples)]
    model, processor = M.load_model(os.path.join(tmp, "tiny")), M.load_processor(os.path.join(tmp, "tiny"))
    M.freeze_vision(model)
    vkw = dict(nframes=16, max_pixels=56 * 56, min_pixels=56 * 56)
    frames, kept = {}, sft.VisionCache(model, processor)

    def step(mode: str) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        t0 = time.time()
        if mode == "kept outputs":
            inputs = kept.inputs(exs, processor, vkw)
        else:
            videos = [data.load_video_cached(e.sample, frames if mode == "kept frames" else None, **vkw) for e in exs]
            inputs = data.build_inputs(processor, [e.sample for e in exs], videos, answers=[e.target for e in exs],
                                       padding_side="right", **vkw)
        loss = sft.sft_loss(model, inputs, sft.make_labels(inputs["input_ids"], processor.tokenizer))
        loss.backward()
        kept.keep(exs, inputs)
        return time.time() - t0, loss.item()

    step("kept frames")  # warm-up; fills both caches
    times = {m: [] for m in ("decoded", "kept frames", "kept outputs")}
    losses = {}
    for _ in range(repeats):
        for m in times:
            t, losses[m] = step(m)
            times[m].append(t)
    best = {m: min(ts) for m, ts in times.items()}
    print(f"sft step, {len(exs)} answers about {len(exs)} videos (tiny preset, --freeze-vision): videos decoded each "
          f"step {best['decoded']:.3f} s, frames kept {best['kept frames']:.3f} s, the frozen tower's outputs kept "
          f"{best['kept outputs']:.3f} s; losses {losses['decoded']:.6f} / {losses['kept frames']:.6f} / "
          f"{losses['kept outputs']:.6f}")
    print(f"sft step speedup: {best['kept frames'] / best['kept outputs']:.2f}x  (frames kept, encoded each step vs "
          f"the tower's outputs kept: sft.VisionCache; {best['decoded'] / best['kept outputs']:.2f}x against decoding "
          f"each step)")


def main() -> None:
    ap = argparse.ArgumentParser(description="Time one GRPO step: naive, ours with the plain update, ours (grpo.py).")
    ap.add_argument("--hidden", type=int, default=384, help="language model width")
    ap.add_argument("--layers", type=int, default=4, help="language model depth")
    ap.add_argument("--vision-hidden", type=int, default=128, help="vision tower width")
    ap.add_argument("--vision-depth", type=int, default=2, help="vision tower depth")
    ap.add_argument("--frames", type=int, default=64, help="frames per video (112x112: 16 video tokens per 2 frames)")
    ap.add_argument("--group-size", type=int, default=8, help="G: samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per answer (fixed length)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (the same for both paths)")
    ap.add_argument("--repeats", type=int, default=3, help="time each path this many times, keep the fastest")
    ap.add_argument("--eval-videos", type=int, default=2, help="videos in the eval part's file")
    ap.add_argument("--queries-per-video", type=int, default=5, help="queries about each of them (at most 5 colours)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default). 1 by default: "
                    "on a shared 2-core machine oversubscribed OpenMP threads make timings swing 10x")
    ap.add_argument("--sft-batch", type=int, default=32, help="answers per SFT step in the sft part (tiny preset: 32)")
    ap.add_argument("--profile", action="store_true", help="also profile one of ours' steps: its time in matmul, "
                    "attention and convolution kernels against the rest (Python, generate's loop, small ops)")
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
        M.use_prefix_attention(policy)  # as grpo.py: plain SDPA, and the packed row's attention
        video = data.load_video(sample, **vkw)
        batch1 = data.build_inputs(processor, [sample], [video], **vkw)
        n_video = int((batch1["input_ids"] == policy.config.video_token_id).sum())
        print(f"model: {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters; prompt "
              f"{batch1['input_ids'].shape[1]} tokens of which {n_video} video tokens ({a.frames} frames); "
              f"G = {G} x {a.new_tokens} new tokens; {torch.get_num_threads()} CPU threads")
        gen = gen_kwargs_for(policy, processor, a.new_tokens)
        adv = grpo.group_advantages(torch.randn(1, G, generator=torch.Generator().manual_seed(1)))[0].float()

        def step(mode: str, ids=None, gen=gen):
            """One GRPO step, `mode` naive, plain or packed -> (seconds rollout, seconds update, CPU seconds,
            new ids, log-probs, loss, grads)."""
            policy.zero_grad(set_to_none=True)
            torch.manual_seed(a.seed)
            t0, c0 = time.time(), time.process_time()
            with torch.no_grad(), torch.profiler.record_function("rollout"):  # a range for --profile
                if mode == "naive":
                    batch, new = naive_rollout(policy, processor, sample, video, G, gen, vkw)
                else:
                    new = grpo.generate_shared(policy, data.build_inputs(processor, [sample], [video], **vkw), G, gen)
            t1 = time.time()
            ids = new if ids is None else ids  # the update runs on the same answers in every path
            tok = processor.tokenizer
            mask = grpo.completion_mask(ids, grpo.stop_ids(policy, tok), tok.pad_token_id)
            if mode == "naive":
                logp, ent = naive_logprobs(policy, batch, ids, mask, 1.0, with_entropy=True)
            else:
                logp, ent = grpo.sequence_logprobs(policy, grpo.prompt_inputs(batch1, 0), ids, mask, 1.0,
                                                   with_entropy=True, packed=mode == "packed")
            # mu = 1 (pi_old = pi) and the authors' entropy bonus 1e-3, so the loss depends on the model
            loss, _ = grpo.grpo_loss(logp, logp.detach(), adv[:, None], mask, entropy=ent, entropy_coef=1e-3)
            loss.backward()
            t2 = time.time()
            grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
            return t1 - t0, t2 - t1, time.process_time() - c0, new, logp.detach() * mask, loss.item(), grads

        step("packed", gen=gen_kwargs_for(policy, processor, 4))  # warm-up: lazy imports, allocator
        runs = {"naive": [], "plain": [], "packed": []}
        repeated = []  # ours' rollout with the prompt's cache repeated G times (generate_shared's old way)
        for _ in range(a.repeats):  # interleaved, so a busy machine slows every path alike
            runs["naive"].append(step("naive"))
            for mode in ("plain", "packed"):
                runs[mode].append(step(mode, ids=runs["naive"][-1][3]))
            torch.manual_seed(a.seed)
            t0 = time.time()
            with torch.no_grad():
                new = M.generate_shared(policy, data.build_inputs(processor, [sample], [video], **vkw), G, gen,
                                        shared_decode=False)
            repeated.append((time.time() - t0, torch.equal(new, runs["packed"][-1][3])))
        # each part's fastest repeat; the rest (samples, log-probs, loss, grads) from the last repeat
        best = {m: (min(r[0] for r in rs), min(r[1] for r in rs), min(r[2] for r in rs), *rs[-1][3:])
                for m, rs in runs.items()}
        names = {"naive": "naive               ", "plain": "ours, plain update  ", "packed": "ours, packed update "}
        for m, (roll, upd, cpu, *_) in best.items():
            print(f"{names[m]}: {roll + upd:6.2f} s  (rollout {roll:.2f} s, loss forward+backward {upd:.2f} s; "
                  f"CPU time {cpu:.1f} s)")
        n, o = best["naive"], best["packed"]
        for m in ("plain", "packed"):
            x = best[m]
            rel = ((n[6] - x[6]).norm() / n[6].norm()).item()
            print(f"{m} vs naive: same samples for the same seed: {torch.equal(n[3], x[3])}; max |logp diff| "
                  f"{(n[4] - x[4]).abs().max().item():.2e}; loss {n[5]:.6f} vs {x[5]:.6f}; gradient relative "
                  f"difference {rel:.2e}")
            assert abs(n[5] - x[5]) < 1e-5 and rel < 1e-3, f"naive and {m} disagree"
        p = best["plain"]
        print(f"speedup: {(n[0] + n[1]) / (p[0] + p[1]):.2f}x  (naive {n[0] + n[1]:.2f} s vs ours with the plain "
              f"update {p[0] + p[1]:.2f} s: the rollout and the video shared)")
        print(f"update speedup: {p[1] / o[1]:.2f}x  (loss forward+backward: G prompt copies {p[1]:.2f} s vs "
              f"packed {o[1]:.2f} s)")
        print(f"step speedup: {(n[0] + n[1]) / (o[0] + o[1]):.2f}x  (naive {n[0] + n[1]:.2f} s vs ours "
              f"{o[0] + o[1]:.2f} s)")
        r = min(t for t, _ in repeated)
        print(f"rollout speedup: {r / o[0]:.2f}x  (ours' rollout, the prompt's KV cache repeated G times {r:.2f} s "
              f"vs held once {o[0]:.2f} s; same samples: {all(same for _, same in repeated)})")
        if a.profile:  # how much of ours is kernels, i.e. what any change to the rest could still give
            from torch.profiler import profile
            kernels = ("aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution", "aten::convolution_backward",
                       "aten::_scaled_dot_product_flash_attention_for_cpu",
                       "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
            with profile() as prof:
                roll, upd, *_ = step("packed", ids=runs["naive"][-1][3])
            events = prof.events()
            inside = next(e.time_range for e in events if e.name == "rollout")
            k = {True: 0.0, False: 0.0}  # kernel seconds in the rollout, in the update
            for e in events:
                if e.name in kernels:
                    k[inside.start <= e.time_range.start <= inside.end] += e.self_cpu_time_total / 1e6
            print(f"profile of ours: {roll:.2f} s rollout + {upd:.2f} s update under the profiler, of which "
                  f"{k[True]:.2f} s + {k[False]:.2f} s in matmul, attention and convolution kernels; step speedup "
                  f"if nothing else took time: {(n[0] + n[1]) / (k[True] + k[False]):.2f}x")

        # --- TaRO (grpo.py --taro) at its costliest, the first step: every rollout guided (the prompt
        #     prefilled once, each row continuing from its prefix), plus the bonus's two no-grad forwards.
        taro = [taro_step(policy, processor, sample, video, G, gen, adv, vkw) for _ in range(a.repeats)]
        t = min(taro)
        print(f"taro step: {t / (o[0] + o[1]):.2f}x ours  (all {G} rollouts guided + the temporal-sensitivity "
              f"forwards {t:.2f} s vs a plain GRPO step {o[0] + o[1]:.2f} s; answers carry their caption prefix)")

        # --- Eval: the same weights, loaded as eval.py loads them (no packed-row attention)
        data.synth(os.path.join(tmp, "e"), n_train=a.eval_videos, n_test=0, seed=1, events=a.queries_per_video)
        queries = ev.by_video(data.read_jsonl(os.path.join(tmp, "e", "train.jsonl")))
        evaluator = M.load_model(os.path.join(tmp, "m")).eval()
        greedy = dict(predict.generation_kwargs(processor.tokenizer, a.new_tokens, 0.0), min_new_tokens=a.new_tokens)
        time_eval(evaluator, processor, queries[:2], greedy, vkw, True, 2)  # warm-up
        # (group by video, queries per generate call): eval.py --no-group-videos; the default
        # (--batch-size 1); --batch-size Q (a video's queries answered together, their prompt prefilled once)
        modes = {"per query": (False, 1), "grouped": (True, 1), "batched": (True, a.queries_per_video)}
        evals = {m: [] for m in modes}
        for _ in range(a.repeats):  # interleaved, as above
            for m, (group, bs) in modes.items():
                evals[m].append(time_eval(evaluator, processor, queries, greedy, vkw, group, bs))
        per, grouped, batched = (min(t for t, _ in evals[m]) for m in modes)
        ref = evals["per query"][-1][1]
        assert evals["grouped"][-1][1] == ref, "grouped answers differ from per-query answers"
        same = sum(x == y for x, y in zip(evals["batched"][-1][1], ref))
        q = len(queries)
        print(f"eval of {q} queries about {a.eval_videos} videos, {a.new_tokens} new tokens each: per query "
              f"{per:.2f} s ({per / q:.3f} s a query); grouped by video {grouped:.2f} s ({grouped / q:.3f} s a "
              f"query), same answers: True; grouped and batched {batched:.2f} s ({batched / q:.3f} s a query), "
              f"same answers: {same} of {q}")
        print(f"eval speedup: {per / batched:.2f}x  (per query {per:.2f} s vs grouped and batched {batched:.2f} s: "
              f"each video decoded, encoded and its prompt prefilled once, its {a.queries_per_video} answers decoded "
              f"together: eval.py --batch-size {a.queries_per_video})")
        print(f"eval speedup, bit-identical: {per / grouped:.2f}x  (per query vs grouped {grouped:.2f} s: each video "
              f"decoded and encoded once, its queries answered one at a time: eval.py's default)")

        # --- SFT with the frozen tower (the tiny preset's cold start)
        sft_part(tmp, a.sft_batch, a.repeats)

if __name__ == "__main__":
    main()
