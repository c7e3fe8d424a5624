"""GRPO: the pure math on hand-computed cases, the shared rollout against the naive one, real learning
on a toy reward, the script on one process and as 2-process ZeRO-3, and kill-and-resume."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import data
import forked
import grpo
import model as M
from conftest import MAX_PIXELS, MIN_PIXELS, NFRAMES, ROOT

PY = sys.executable
TINY = ["--nframes", str(NFRAMES), "--max-pixels", str(MAX_PIXELS), "--min-pixels", str(MIN_PIXELS),
        "--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "16"]


def env():
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    e.pop("PYTHONUNBUFFERED", None)  # the script must flush its own log lines (the kill test reads them live)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_grpo(*args, check=True, timeout=300, nproc=1):
    """`python grpo.py ARGS` (nproc > 1: as torchrun's ranks), started by tests/forked.py."""
    p = forked.run("grpo.py", args, nproc=nproc, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


# -----------------------------------------------------------------------------
# The math


def test_group_advantages_hand_computed():
    a = grpo.group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.9]]))
    # row 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.866
    assert torch.allclose(a[0], torch.tensor([1, -1, 1, -1], dtype=a.dtype) * 0.5 / (math.sqrt(1 / 3) + 1e-6))
    assert torch.equal(a[1], torch.zeros(4, dtype=a.dtype))  # all equal: no signal, and no NaN
    # row 2: mean 0.225, std sqrt((3 * 0.225^2 + 0.675^2) / 3) = 0.45
    assert torch.allclose(a[2], torch.tensor([-0.225, -0.225, -0.225, 0.675], dtype=a.dtype) / 0.45, atol=1e-5)
    assert torch.allclose(a.sum(1), torch.zeros(3, dtype=a.dtype), atol=1e-9)
    single = grpo.group_advantages(torch.tensor([[0.7], [0.1]]))  # G = 1: no baseline -> 0, not NaN
    assert single.shape == (2, 1) and torch.equal(single, torch.zeros(2, 1, dtype=single.dtype))


def test_completion_mask_stops_at_the_first_eos_and_drops_padding():
    E, P = 9, 0
    ids = torch.tensor([[5, 6, E, P, P],   # EOS counted, padding after it not
                        [5, 6, 7, 8, 4],   # truncated without EOS: every token counts
                        [E, 5, E, P, P],   # only the first EOS ends the answer
                        [5, 6, P, P, P]])  # truncated, then padded
    assert grpo.completion_mask(ids, E, P).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0],
                                                        [1, 1, 0, 0, 0]]
    # several stop ids, the pad among them (Qwen2.5-VL: <|im_end|> and <|endoftext|> = its pad)
    ids = torch.tensor([[5, P, P, P], [5, 6, E, P], [5, 6, 7, 8]])
    assert grpo.completion_mask(ids, [E, P], P).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_grpo_loss_on_policy_is_minus_the_token_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.1, -4.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([[1.0], [-0.5]])
    loss, st = grpo.grpo_loss(logp, logp.detach(), adv, mask)
    assert loss.item() == pytest.approx(-(2 * 1.0 + 3 * -0.5) / 5)  # token mean over the 5 tokens
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.2, -0.2, 0.0], [0.1, 0.1, 0.1]]))
    assert st["clip_frac"] == 0.0 and st["ratio"] == pytest.approx(1.0) and "kl" not in st
    # n_tokens: the mean is over the whole mini-batch, so a micro-batch divides by the larger count
    half, _ = grpo.grpo_loss(logp, logp.detach(), adv, mask, n_tokens=10)
    assert half.item() == pytest.approx(loss.item() / 2)


@pytest.mark.parametrize("ratio, adv, eps_high, want_loss, want_grad, clipped", [
    (1.5, 1.0, None, -1.2, 0.0, 1.0),   # above 1 + eps pushing up: clipped, no gradient
    (1.5, -1.0, None, 1.5, 1.5, 0.0),   # above 1 + eps pushing down: min keeps the unclipped term
    (0.5, -1.0, None, 0.8, 0.0, 1.0),   # below 1 - eps pushing down: clipped
    (0.5, 1.0, None, -0.5, -0.5, 0.0),  # below 1 - eps pushing up: unclipped
    (1.25, 1.0, None, -1.2, 0.0, 1.0),  # symmetric clip at 1.2 ...
    (1.25, 1.0, 0.28, -1.25, -1.25, 0.0),  # ... but inside a separate upper bound of 1.28
])
def test_grpo_loss_clipping(ratio, adv, eps_high, want_loss, want_grad, clipped):
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_(True)
    loss, st = grpo.grpo_loss(logp, old, torch.tensor([[adv]]), torch.ones(1, 1), clip_eps=0.2, clip_eps_high=eps_high)
    loss.backward()
    assert loss.item() == pytest.approx(want_loss, abs=1e-6)
    assert logp.grad.item() == pytest.approx(want_grad, abs=1e-6)  # d(-ratio * A)/d logp = -ratio * A
    assert st["clip_frac"] == clipped


def test_grpo_loss_k3_kl_and_entropy_bonus():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    zero = torch.zeros(1, 1)
    loss, st = grpo.grpo_loss(logp, logp, zero, torch.ones(1, 2), ref_logp=ref, beta=0.1)
    k3 = 0.5 - math.log(0.5) - 1  # exp(d) - d - 1 with d = log(0.25 / 0.5); 0 where ref == logp
    assert st["kl"] == pytest.approx(k3 / 2) and loss.item() == pytest.approx(0.1 * k3 / 2)
    ent = torch.tensor([[2.0, 4.0]])
    loss, st = grpo.grpo_loss(logp, logp, zero, torch.ones(1, 2), entropy=ent, entropy_coef=0.01)
    assert loss.item() == pytest.approx(-0.01 * 3.0) and st["entropy"] == pytest.approx(3.0)


# -----------------------------------------------------------------------------
# The shared rollout (video encoded and prompt prefilled once per group) against the naive one


class Record:
    """A logits processor that keeps the raw scores generate samples from (a test probe)."""
    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_shared_prefix_attention_is_attention_over_the_whole_row(q, mask_kind):
    """Sampling's attention with the prompt held once per prompt (model.shared_prefix_attention) against
    SDPA over each row's own copy of [prompt; own tokens]: 2 prompts x G = 3 rows, grouped-query heads
    (2 per key head), the second prompt left-padded by 2, q new tokens attending causally."""
    torch.manual_seed(0)
    P, G, Hkv, n_rep, Lpre, t, d = 2, 3, 2, 2, 7, 4, 8
    B, H = P * G, Hkv * n_rep
    pk, pv = torch.randn(P, Hkv, Lpre, d), torch.randn(P, Hkv, Lpre, d)
    key, value, query = torch.randn(B, Hkv, t, d), torch.randn(B, Hkv, t, d), torch.randn(B, H, q, d)
    allowed = torch.ones(B, 1, q, Lpre + t, dtype=torch.bool).tril(Lpre + t - q)  # token Lpre + t - q + i sees <= it
    if mask_kind != "none":
        allowed[G:, :, :, :2] = False  # the second prompt's padding
    mask = {"bool": allowed, "float": torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")),
            "none": None}[mask_kind]
    whole = lambda pre, own: torch.cat([pre.repeat_interleave(G, 0), own], 2).repeat_interleave(n_rep, 1)  # noqa: E731
    want = torch.nn.functional.scaled_dot_product_attention(query, whole(pk, key), whole(pv, value),
                                                            attn_mask=allowed).transpose(1, 2)
    got, _ = M.shared_prefix_attention(None, query, key, value, mask, M.SharedPrefix(pk, pv))
    assert got.shape == (B, q, H, d) and (got - want).abs().max() < 1e-5


def test_shared_path_gives_the_naive_samples_and_log_probs(tiny_model_dir, synth_dir):
    from transformers import LogitsProcessorList
    import bench
    m, proc = M.load_model(tiny_model_dir), M.load_processor(tiny_model_dir)
    M.use_prefix_attention(m)  # as grpo.py: the loss forward below is the packed row
    vkw = dict(nframes=NFRAMES, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
    samples = data.read_jsonl(synth_dir / "train.jsonl")[::4][:3]  # 3 videos, prompts of different lengths
    videos = [data.load_video(s, **vkw) for s in samples]
    G, tok = 4, proc.tokenizer
    gen = bench.gen_kwargs_for(m, proc, 10)
    del gen["min_new_tokens"]

    # 1. One prompt: the same seed samples the same answers as G copies of the prompt, and the shared
    #    training forward (video features once) gives the naive forward's log-probs (pixels x G).
    for s, v in zip(samples, videos):
        torch.manual_seed(0)
        batch, naive = bench.naive_rollout(m, proc, s, v, G, gen, vkw)
        torch.manual_seed(0)
        ours = grpo.generate_shared(m, data.build_inputs(proc, [s], [v], **vkw), G, gen)
        assert torch.equal(naive, ours)
        torch.manual_seed(0)  # the prompt's cache repeated G times: the same answers too
        assert torch.equal(grpo.generate_shared(m, data.build_inputs(proc, [s], [v], **vkw), G, gen,
                                                shared_decode=False), ours)
        assert all(a.self_attn.shared_prefix is None for a in m.model.language_model.layers)  # cleared after
        mask = grpo.completion_mask(ours, grpo.stop_ids(m, tok), tok.pad_token_id)
        with torch.no_grad():
            lp_naive = bench.naive_logprobs(m, batch, ours, mask, 1.0)
            lp_ours = grpo.sequence_logprobs(m, grpo.prompt_inputs(batch, 0), ours, mask, 1.0)[0]
        assert ((lp_naive - lp_ours).abs() * mask).max() < 1e-4

    # 2. Several left-padded prompts in one generate: the distribution each token was sampled from
    #    is the one the loss forward computes (positions continue from the cache correctly).
    batch = data.build_inputs(proc, samples, videos, **vkw)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # really padded
    rec = Record()  # runs after the vision tokens are suppressed: it sees the sampling distribution
    torch.manual_seed(1)
    new = grpo.generate_shared(m, batch, G, dict(gen, logits_processor=LogitsProcessorList([rec])))
    sampled = torch.stack(rec.scores, 1).float().log_softmax(-1).gather(-1, new[..., None]).squeeze(-1)
    for i in range(len(samples)):
        ids, rows = new[i * G:(i + 1) * G], slice(i * G, (i + 1) * G)
        mask = grpo.completion_mask(ids, grpo.stop_ids(m, tok), tok.pad_token_id)
        with torch.no_grad():
            lp = grpo.sequence_logprobs(m, grpo.prompt_inputs(batch, i), ids, mask, 1.0, M.suppress_ids(tok))[0]
        assert ((lp - sampled[rows]).abs() * mask).max() < 1e-4, i


# -----------------------------------------------------------------------------
# Real learning: a reward that prefers particular answers goes up over a few GRPO steps

TOY = textwrap.dedent("""
    import sys
    import data, grpo, model
    model_dir, data_path, out, steps, *extra = sys.argv[1:]
    args = grpo.parse_args(["--model", model_dir, "--data", data_path, "--out", out, "--group-size", "8",
                            "--max-new-tokens", "8", "--drop-uniform-groups", "--nframes", "16",
                            "--max-pixels", "3136", "--min-pixels", "3136", *extra])
    engine, ref, processor, keep = grpo.setup(args)
    rank, world, _ = model.dist_env()
    samples = data.read_jsonl(data_path)
    half = len(processor.tokenizer) // 2

    def prefer_low_ids(sample, text, ids):  # the share of answer tokens from the first half of the vocabulary
        if world > 1 and rank == 0:
            return 0.0, {}  # uniform: rank 0 drops its group while rank 1 keeps its own
        return sum(i < half for i in ids) / max(len(ids), 1), {}

    for step in range(1, int(steps) + 1):
        prompts = grpo.step_prompts(samples[:2], step, args, rank, world)
        st = grpo.grpo_step(engine, ref, processor, prompts, args, reward_fn=prefer_low_ids).stats
        with open(f"{out}.rank{rank}", "a") as f:  # one file per rank: their stdout lines interleave
            f.write(f"{rank} {st['reward'] / st['n']} {st['clip_frac'] / max(st['tokens'], 1)} {st['opt_steps']} "
                    f"{st['dropped']}\\n")
""")


def run_toy(tmp_path, model_dir, data_path, steps, *extra, nproc=1):
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    p = forked.run(str(script), [model_dir, data_path, tmp_path / "out", steps, *extra], nproc=nproc)
    assert p.returncode == 0, p.stdout + p.stderr
    return [[float(x) for x in ln.split()] for r in range(nproc) for ln in
            (tmp_path / f"out.rank{r}").read_text().splitlines()]


def test_grpo_steps_raise_the_reward_on_a_toy_task(tiny_model_dir, synth_dir, tmp_path):
    # --update-chunk 3: each group of 8 in packed forwards of 3, 3 and 2 answers (pi_old too)
    steps = run_toy(tmp_path, tiny_model_dir, str(synth_dir / "train.jsonl"), 6,
                    "--prompts-per-step", "2", "--lr", "5e-2", "--mu", "2", "--update-chunk", "3")
    rewards = [s[1] for s in steps]
    assert len(rewards) == 6
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.15, rewards  # ~0.5 (chance) -> ~0.9
    # mu = 2: the second pass over a rollout batch is off-policy, and the clip acts on it
    assert steps[0][3] == 2 and steps[0][2] > 0, steps


def test_two_process_zero3_with_a_dropped_group_on_one_rank(tiny_model_dir, synth_dir, tmp_path):
    # Rank 0's group has equal rewards and is dropped, rank 1's is not: rank 0 must still run a
    # (zero-weight) forward/backward or ZeRO-3 would deadlock. Weights gathered once per rollout; each
    # group of 8 answers in two packed forwards (--update-chunk 5), on both ranks.
    steps = run_toy(tmp_path, tiny_model_dir, str(synth_dir / "train.jsonl"), 2, "--prompts-per-step", "2",
                    "--lr", "1e-2", "--zero-stage", "3", "--gather-for-rollout", "--update-chunk", "5", nproc=2)
    by_rank = {r: [s for s in steps if s[0] == r] for r in (0, 1)}
    assert len(by_rank[0]) == len(by_rank[1]) == 2
    assert all(s[4] == 1 and s[3] == 1 for s in by_rank[0])  # dropped, yet the optimizer step happened
    assert all(s[4] == 0 for s in by_rank[1])


# -----------------------------------------------------------------------------
# The script: 2-process ZeRO-3 (with a reference model), and one process killed and resumed


def test_two_process_zero3_step_with_reference_model(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "z3"
    p = run_grpo("--model", tiny_model_dir, "--data", str(synth_dir / "train.jsonl"), "--out", str(out), *TINY,
                 "--steps", "2", "--zero-stage", "3", "--beta", "0.04", "--entropy-coef", "0.5", "--lr", "1e-3",
                 nproc=2)
    assert "2 rank(s) x 1 prompts x G=4 = 8 answers per step" in p.stdout
    assert "reference model loaded (beta > 0)" in p.stdout
    recs = metrics(out)
    assert [r["step"] for r in recs] == [1, 2] and all(r["opt_steps"] == 1 for r in recs)
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-9) and recs[1]["kl"] > 0  # the policy left the reference
    final, start = weights(out / "model"), weights(tiny_model_dir)  # consolidated from the two shards
    moved = {k: (final[k] - w).abs().max().item() for k, w in start.items()}
    assert max(v for k, v in moved.items() if "visual" not in k) > 1e-5
    assert max(v for k, v in moved.items() if "visual" in k) > 1e-5  # gradient reached the shared video features
    assert isinstance(M.load_model(str(out / "model")), torch.nn.Module)


def test_kill_and_resume_continues_the_same_run(tiny_model_dir, synth_dir, tmp_path):
    common = ["--model", tiny_model_dir, "--data", str(synth_dir / "train.jsonl"), *TINY, "--steps", "6",
              "--save-every", "2", "--entropy-coef", "0.5", "--lr", "1e-3", "--log-rollouts", "3"]
    whole = tmp_path / "whole"
    p = run_grpo(*common, "--out", str(whole))
    assert "no reference model (beta = 0)" in p.stdout
    # Beta = 0: no KL anywhere; the rollouts log holds the answers with their parsed span and reward.
    assert all("kl" not in r for r in metrics(whole))
    rolls = [json.loads(x) for x in (whole / "rollouts.jsonl").read_text().splitlines()]
    assert len(rolls) == 6 * 3 and set(rolls[0]) >= {"step", "id", "response", "span", "gt", "reward"}
    assert (whole / "curves.png").stat().st_size > 1000

    # Kill the run as soon as its first checkpoint is written, then resume it. Started as a user starts
    # it (a fresh interpreter, stdout a pipe): the script must flush its own log lines to be read live.
    out = tmp_path / "killed"
    proc = subprocess.Popen([PY, "grpo.py", *common, "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env(), start_new_session=True)
    for line in proc.stdout:
        if "saved" in line and "checkpoint-000002" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "model").exists()
    p = run_grpo(*common, "--out", str(out), check=False)  # checkpoints and no --resume: refused, not mixed
    assert p.returncode != 0 and "--resume" in p.stderr
    p = run_grpo(*common, "--out", str(out), "--resume")
    assert "resumed from" in p.stdout and "continuing at step" in p.stdout
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]  # each step once
    # Same data order, sampling RNG, optimizer state: the resumed run IS the uninterrupted one.
    for a, b in zip(metrics(whole), metrics(out)):
        assert a["reward"] == b["reward"] and a["length"] == b["length"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    w1, w2 = weights(whole / "model"), weights(out / "model")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-6
    p = run_grpo(*common, "--out", str(out), "--resume")  # a finished run does nothing
    assert "finished run" in p.stdout


def test_bad_input_stops_before_the_model_loads(tiny_model_dir, synth_dir, tmp_path):
    rl = tmp_path / "rl.jsonl"
    s = data.read_jsonl(synth_dir / "train.jsonl")[0]
    s.video = str(tmp_path / "nowhere.mp4")
    data.write_jsonl(rl, [s])
    p = run_grpo("--model", tiny_model_dir, "--data", str(rl), "--out", str(tmp_path / "o"), *TINY, check=False)
    assert p.returncode != 0 and s.id in p.stderr and "nowhere.mp4" in p.stderr, p.stderr
    p = run_grpo("--model", tiny_model_dir, "--data", str(rl), "--out", str(tmp_path / "o"), *TINY,
                 "--prompts-per-step", "3", "--mini-batch", "2", check=False)
    assert p.returncode != 0 and "--mini-batch 2 must divide --prompts-per-step 3" in p.stderr, p.stderr
