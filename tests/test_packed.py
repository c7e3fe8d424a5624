"""The shared-prefix training forward (model.completion_logprobs, grpo.py --update packed): the packed
row [prompt; c_1 ... c_G] gives the plain G-row forward's log-probs, loss and gradients, with and
without activation checkpointing, and as 2-process ZeRO-3 with the same parameter gathers; its
positions are the plain rows' and its attention is attention under the row's mask; pi_old is pi to the
bit; the chunked log-probs equal a full softmax and keep no logits for backward."""
import textwrap

import pytest
import torch

import data
import forked
import grpo
import model as M
from conftest import MAX_PIXELS, MIN_PIXELS, NFRAMES

VKW = dict(nframes=NFRAMES, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)


def completions(tok, lengths, Lc, seed):
    """(G, Lc) answers of the given lengths as generate returns them: ordinary tokens, an EOS last
    (none when truncated at Lc), padding after; and their completion_mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tok) - len(M.SPECIAL_TOKENS), (len(lengths), Lc), generator=g)
    for i, n in enumerate(lengths):
        if n < Lc:
            ids[i, n - 1], ids[i, n:] = tok.eos_token_id, tok.pad_token_id
    mask = grpo.completion_mask(ids, [tok.eos_token_id, tok.pad_token_id], tok.pad_token_id)
    assert mask.sum(1).tolist() == lengths
    return ids, mask


def groups_of(m, proc, samples, lengths, Lc=12):
    """Several prompts (of different lengths), each with G answers of unequal lengths."""
    videos = [data.load_video(s, **VKW) for s in samples]
    batch = data.build_inputs(proc, samples, videos, **VKW)
    return [(grpo.prompt_inputs(batch, i), *completions(proc.tokenizer, n, Lc, seed=i)) for i, n in enumerate(lengths)]


# -----------------------------------------------------------------------------
# One process, float32: packed == plain


@pytest.mark.parametrize("grad_ckpt, per_forward", [(False, 4), (True, 4), (False, 3)])
def test_packed_update_equals_the_plain_one(tiny_model_dir, synth_dir, grad_ckpt, per_forward):
    m, proc = M.load_model(tiny_model_dir), M.load_processor(tiny_model_dir)
    M.use_prefix_attention(m)
    if grad_ckpt:
        m.activation_checkpointing_enable()
    m.train()
    samples = data.read_jsonl(synth_dir / "train.jsonl")[::4][:3]
    groups = groups_of(m, proc, samples, [[3, 12, 1, 7], [12, 5, 9, 2], [6, 6, 11, 4]])
    assert len({p["input_ids"].shape[1] for p, _, _ in groups}) > 1  # prompts of different lengths
    never, G = M.suppress_ids(proc.tokenizer), 4
    parts = [slice(a, a + per_forward) for a in range(0, G, per_forward)]  # grpo.py --update-chunk
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8])[:, None]
    n_tokens = sum(float(mask.sum()) for _, _, mask in groups)
    # pi_old and pi_ref fixed and away from pi, so the loss depends on the log-probs' values
    with torch.no_grad():
        fixed = [grpo.sequence_logprobs(m, p, ids, mask, 0.7, never, packed=False)[0] for p, ids, mask in groups]

    def update(packed):
        m.zero_grad(set_to_none=True)
        logps, loss_sum = [], 0.0
        for (prompt, ids, mask), f in zip(groups, fixed):
            for s in parts:
                lp, ent = grpo.sequence_logprobs(m, prompt, ids[s], mask[s], 0.7, never, with_entropy=True, packed=packed)
                loss, _ = grpo.grpo_loss(lp, f[s] - 0.05, adv[s], mask[s], ref_logp=f[s] + 0.1, beta=0.04,
                                         entropy=ent, entropy_coef=0.1, n_tokens=n_tokens)
                loss.backward()
                loss_sum += loss.item()
                logps.append(lp.detach() * mask[s])
        return torch.cat(logps), loss_sum, {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    plain, packed = update(False), update(True)
    assert (plain[0] - packed[0]).abs().max() < 1e-5
    with torch.no_grad():  # pi_old as grpo.py computes it: the same forwards, so pi / pi_old is exactly 1
        old = torch.cat([grpo.sequence_logprobs(m, p, ids[s], mask[s], 0.7, never)[0] * mask[s]
                         for p, ids, mask in groups for s in parts])
    assert torch.equal(old, packed[0])
    assert packed[1] == pytest.approx(plain[1], rel=1e-4)
    assert plain[2].keys() == packed[2].keys() and any("visual" in k for k in plain[2])  # the video is trained too
    for k, g in plain[2].items():
        assert (packed[2][k] - g).norm() <= 1e-4 * g.norm() + 1e-12, k


def test_packed_row_positions_and_layout_are_the_plain_rows(tiny_model_dir, synth_dir):
    m, proc = M.load_model(tiny_model_dir), M.load_processor(tiny_model_dir)
    M.use_prefix_attention(m)
    (prompt, ids, mask), = groups_of(m, proc, data.read_jsonl(synth_dir / "train.jsonl")[:1], [[2, 4, 1]])
    n = mask.sum(1).long()
    inputs, at = M.packed_inputs(m, prompt, ids, n)
    Lp, T = prompt["input_ids"].shape[1], inputs["input_ids"].shape[1]
    assert T == Lp + 7 and inputs["position_ids"].shape == (3, 1, T)
    # Each completion's 3-D positions are those it has in its own row [prompt; c_i] (the model's rule:
    # the text after the video resumes after the video's last position).
    a = Lp
    for i, k in enumerate(n.tolist()):
        row = torch.cat([prompt["input_ids"], ids[i:i + 1, :k]], 1)
        types = torch.cat([prompt["mm_token_type_ids"], torch.zeros(1, k, dtype=torch.long)], 1)
        pos, _ = m.model.get_rope_index(row, types, video_grid_thw=prompt["video_grid_thw"],
                                        second_per_grid_ts=prompt["second_per_grid_ts"])
        assert torch.equal(inputs["position_ids"][:, :, :Lp], pos[:, :, :Lp])
        assert torch.equal(inputs["position_ids"][:, :, a:a + k], pos[:, :, Lp:])
        assert torch.equal(inputs["input_ids"][0, a:a + k], ids[i, :k])
        a += k
    lay = inputs["packed_layout"]
    assert lay.prompt_len == Lp and lay.valid.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert lay.rows[lay.valid].tolist() == list(range(Lp, T))
    # Token 0 of every completion is predicted from the prompt's last position.
    assert at.tolist() == [Lp - 1, Lp, Lp - 1, Lp + 2, Lp + 3, Lp + 4, Lp - 1]
    with pytest.raises(AssertionError, match="use_prefix_attention"):  # plain SDPA would mix completions
        M.packed_inputs(M.load_model(tiny_model_dir), prompt, ids, n)


def test_prefix_attention_is_attention_under_the_packed_mask(tiny_model_dir):
    # The two SDPA calls against one SDPA call with the row's (T, T) rule: causal, and a completion
    # sees the prompt and itself, never another completion. Grouped KV heads as in the model.
    from transformers.integrations.sdpa_attention import repeat_kv
    attn = M.load_model(tiny_model_dir).model.language_model.layers[0].self_attn
    H, Hkv, d, Lp, n = attn.config.num_attention_heads, attn.num_key_value_heads, attn.head_dim, 9, [3, 5, 1]
    assert Hkv < H  # grouped
    T, G, C = Lp + sum(n), len(n), max(n)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, T, d, requires_grad=True) for h in (H, Hkv, Hkv))
    starts = torch.tensor([Lp, Lp + 3, Lp + 8])
    valid = torch.arange(C) < torch.tensor(n)[:, None]
    lay = M.PackedLayout(Lp, torch.where(valid, starts[:, None] + torch.arange(C), 0), valid)
    seg = [0] * Lp + [1] * 3 + [2] * 5 + [3]
    rule = torch.tensor([[kv <= i and (seg[kv] == 0 or seg[kv] == seg[i]) for kv in range(T)] for i in range(T)])
    w = torch.randn(1, T, H, d)
    outs = []
    for f in (lambda: M.prefix_attention(attn, q, k, v, None, packed_layout=lay, scaling=0.3)[0],
              lambda: torch.nn.functional.scaled_dot_product_attention(
                  q, repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv), attn_mask=rule, scale=0.3).transpose(1, 2)):
        q.grad = k.grad = v.grad = None
        o = f()
        (o * w).sum().backward()
        outs.append((o.detach(), q.grad, k.grad, v.grad))
    for got, want in zip(*outs):
        assert torch.allclose(got, want, atol=1e-6)


# -----------------------------------------------------------------------------
# Chunked log-probs: the memory defect


def test_chunked_logprobs_entropy_and_gradients_equal_the_full_softmax():
    torch.manual_seed(0)
    V, h, N, T = 50, 16, 23, 0.7
    head = torch.nn.Linear(h, V, bias=False)
    hidden, y, never = torch.randn(N, h, requires_grad=True), torch.randint(0, V - 2, (N,)), [V - 1, V - 2]
    calls, saved = [], []
    head.register_forward_pre_hook(lambda mod, inp: calls.append(inp[0].shape[0]))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        lp, ent = M.token_logprobs(head, hidden, y, T, never, with_entropy=True, chunk=10)
    # 3 lm_head calls of at most 10 positions; nothing of shape (., V) is kept for backward
    assert calls == [10, 10, 3] and saved and all(shape[-1] != V for shape in saved), saved
    w = torch.randn(2, N)
    (lp @ w[0] + ent @ w[1]).backward()
    assert sorted(calls[3:]) == [3, 10, 10]  # backward recomputed each chunk's logits (last chunk first)
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    logits = head(hidden).float() / T  # the plain way: (N, V) at once
    logits[:, never] = float("-inf")
    full = logits.log_softmax(-1)
    want_lp = full.gather(-1, y[:, None]).squeeze(-1)
    want_ent = -(full.exp() * full.where(full.isfinite(), 0.0)).sum(-1)
    (want_lp @ w[0] + want_ent @ w[1]).backward()
    assert torch.allclose(lp, want_lp, atol=1e-6) and torch.allclose(ent, want_ent, atol=1e-6)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6) and torch.allclose(grads[1], head.weight.grad, atol=1e-6)
    with torch.no_grad():  # pi_old, pi_ref: no checkpoint, same numbers
        assert torch.equal(M.token_logprobs(head, hidden, y, T, never, chunk=10)[0], lp.detach())


# -----------------------------------------------------------------------------
# 2-process ZeRO-3 with activation checkpointing: packed == plain, through the DeepSpeed engine

Z3 = textwrap.dedent("""
    import sys
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad
    import data, grpo, model
    import probe_allgather  # counts the bytes ZeRO-3 all-gathers
    from test_packed import groups_of
    model_dir, data_path, out = sys.argv[1:]
    model.init_distributed()
    cfg = model.ds_config(micro_batch=1, grad_accum=1, zero_stage=3, lr=1e-3, bf16=False, small_model=True)
    # no prefetching and no keeping for reuse: one gather per use of a module, so the bytes compare
    cfg["zero_optimization"].update(stage3_prefetch_bucket_size=0, stage3_max_reuse_distance=0)
    policy, keep = model.load_for_training(model_dir, cfg, torch.float32)
    policy.activation_checkpointing_enable()
    model.use_prefix_attention(policy)
    engine, *_ = deepspeed.initialize(model=policy, config=cfg, model_parameters=policy.parameters())
    processor, rank = model.load_processor(model_dir), model.dist_env()[0]
    (prompt, ids, mask), = groups_of(policy, processor, [data.read_jsonl(data_path)[4 * rank]], [[3, 12, 1, 7]])
    calls = []
    policy.lm_head.register_forward_pre_hook(lambda *a: calls.append(1))
    policy.train()
    res = {}
    for packed in (False, True):
        calls.clear()
        gathered = probe_allgather.total[0]
        engine.set_gradient_accumulation_boundary(True)
        lp, ent = grpo.sequence_logprobs(policy, prompt, ids, mask, 1.0, model.suppress_ids(processor.tokenizer),
                                         with_entropy=True, forward=engine, packed=packed)
        loss, _ = grpo.grpo_loss(lp, lp.detach() - 0.05, torch.tensor([[1.0], [-0.5], [0.3], [-0.8]]), mask,
                                 entropy=ent, entropy_coef=0.1)
        engine.backward(loss, scale_wrt_gas=False)
        gathered = probe_allgather.total[0] - gathered
        grads = {k: safe_get_full_grad(p).clone() for k, p in policy.named_parameters()}
        engine.optimizer.zero_grad()
        res[packed] = dict(logp=lp.detach() * mask, loss=loss.item(), grads=grads, lm_head_calls=len(calls),
                           gathered=gathered)
    torch.save(res, f"{out}.rank{rank}.pt")
""")


def test_two_process_zero3_packed_gives_the_plain_gradients_with_the_same_gathers(tiny_model_dir, synth_dir, tmp_path):
    script = tmp_path / "z3.py"
    script.write_text(Z3)
    p = forked.run(str(script), [tiny_model_dir, synth_dir / "train.jsonl", tmp_path / "o"], nproc=2)
    assert p.returncode == 0, p.stdout + p.stderr
    r0, r1 = (torch.load(tmp_path / f"o.rank{r}.pt") for r in (0, 1))
    for res in (r0, r1):
        plain, packed = res[False], res[True]
        assert (plain["logp"] - packed["logp"]).abs().max() < 1e-5
        assert packed["loss"] == pytest.approx(plain["loss"], rel=1e-4)
        moved = [k for k, g in plain["grads"].items() if g.norm() > 0]
        assert any("visual" in k for k in moved) and any("lm_head" in k for k in moved)
        for k, g in plain["grads"].items():
            assert (packed["grads"][k] - g).norm() <= 1e-4 * g.norm() + 1e-12, k
        # lm_head per forward + backward: HF's single logit, then one chunk and its recompute. Under
        # ZeRO-3 each is a gather of lm_head's weight (plus the one for its backward).
        assert packed["lm_head_calls"] == 3
        assert packed["gathered"] == plain["gathered"] > 0  # the packed row gathers no parameter more
    assert torch.equal(r0[True]["grads"]["lm_head.weight"], r1[True]["grads"]["lm_head.weight"])  # averaged over ranks
