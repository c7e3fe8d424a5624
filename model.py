"""The model: load Qwen2.5-VL (a hub id or a local directory), or build a tiny random one offline.

    python model.py tiny --out runs/tiny/base_model --layers 2  # ~0.8M parameters, CPU, seconds
    python model.py info --model Qwen/Qwen2.5-VL-7B-Instruct  # parameter count; --meta builds no weights

The tiny model is a REAL `Qwen2_5_VLForConditionalGeneration` with a real (small) byte-level BPE
tokenizer, the Qwen2-VL processor and chat template, saved with `save_pretrained`. Every stage loads
it with `load_model` / `load_processor`, exactly the code path that loads Qwen/Qwen2.5-VL-7B-Instruct,
so the CPU preset exercises the same code as the 16-GPU run. Only the sizes differ.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass

import torch

# The Qwen2-VL / Qwen2.5-VL chat template (the one the released checkpoints ship): a video becomes
# <|vision_start|><|video_pad|><|vision_end|>, which the processor expands to one pad per video token.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5's special tokens in their real order (ids 151643.. in the real vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
VISION_TOKENS = ["<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]


# -----------------------------------------------------------------------------
# HACK: restore Qwen2.5-VL's own position ids after a video. The released model (and transformers up
# to 5.2) resumes the text after the video's LAST position (temporal ids reach start + seconds *
# tokens_per_second); transformers 5.3+ resumes it at start + max(h, w) / 2, inside the video's time
# range (huggingface/transformers#45381). The 7B was pretrained with the former, so every stage must
# use it. Same signature and outputs as the library's method; only the resume position differs.

def get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                   second_per_grid_ts=None, attention_mask=None, **kwargs):
    import itertools
    merge = self.config.vision_config.spatial_merge_size
    tokens_per_second = self.config.vision_config.tokens_per_second
    dev = input_ids.device
    position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=dev)  # (3, B, T)
    grids = {1: iter(image_grid_thw if image_grid_thw is not None else []),
             2: iter(video_grid_thw if video_grid_thw is not None else [])}
    seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
    deltas = []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(input_ids[b], dtype=torch.bool)
        pieces, pos = [], 0
        for kind, run in itertools.groupby(mm_token_type_ids[b][keep].tolist()):  # 0 text, 1 image, 2 video
            if kind == 0:
                n = len(list(run))
                pieces.append(torch.arange(pos, pos + n, device=dev).expand(3, -1))
                pos += n
            else:
                interval = tokens_per_second * next(seconds) if kind == 2 else 1.0  # seconds -> position units
                ids = self.get_vision_position_ids(pos, next(grids[kind]), 1, merge, interval, device=dev)
                pieces.append(ids)
                pos = int(ids.max()) + 1  # the text resumes after the video's last position
        flat = torch.cat(pieces, dim=1)
        position_ids[:, b, keep] = flat.to(position_ids.dtype)
        deltas.append(pos - int(keep.sum()))
    return position_ids, torch.tensor(deltas, device=dev).unsqueeze(1)


def _install_rope_fix():
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m
    m.Qwen2_5_VLModel.get_rope_index = get_rope_index


_install_rope_fix()


def load_processor(path: str):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(path)


def load_model(path: str, dtype: torch.dtype = torch.float32, attn: str | None = None):
    """One loader for every stage: a local directory (the tiny model, an SFT checkpoint) or a hub id.
    Call it AFTER creating `HfDeepSpeedConfig` for ZeRO-3 so the weights load partitioned."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    kw = {"dtype": dtype}
    if attn:
        kw["attn_implementation"] = attn
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **kw)


def suppress_ids(tokenizer) -> list[int]:
    """Token ids the policy must never sample: a sampled <|video_pad|> breaks the next forward
    (the processor would expect video features for it)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]


# -----------------------------------------------------------------------------
# The training forward of G completions of one prompt (grpo.py): per-token log-probs and entropies.
#
# Packed (the default): ONE row [prompt; c_1 ... c_G], so the prompt's forward and backward run once
# per group instead of G times. Plain: G rows [prompt; c_i] (the prompt copied G times, the video
# still encoded once), kept for comparison. Both return the same numbers (tests/test_packed.py).

# Positions per lm_head call. Each call materialises a few (chunk, V) float32 tensors (~2.5 GB each at
# the 7B's V = 152,064), never (G, Lc, V). Under ZeRO-3 every lm_head call gathers its weight (1.1 GB
# in bf16), and ZeRO-3's hooks re-partition it after each call even inside GatheredParameters
# (STACK.md), so we keep the calls few and large instead: HF's forward's one logit (logits_to_keep=1;
# we run HF's forward through the engine because DeepSpeed's backward set-up hooks sit on its outputs,
# here the hidden states the loss flows through), then per chunk the call, its recompute in backward
# and the backward: 1 + 3 gathers per group with the paper's mean answers (8 x 400 tokens, one
# chunk), 13 at 8 x 2,048 (tests/test_packed.py counts the calls).
LOGIT_CHUNK = 4096

# The text model's attention, registered with transformers. Its name must not contain "sdpa", "flash"
# or "flex_attention": transformers dispatches on those words.
PREFIX_ATTENTION = "prefix_shared"


@dataclass
class PackedLayout:
    """Where the completions are in a packed row (packed_inputs); a forward kwarg that transformers
    hands to every attention call."""
    prompt_len: int  # Lp: the row starts with the prompt
    rows: torch.Tensor  # (G, C) row index of completion i's token j (0 where j >= n_i)
    valid: torch.Tensor  # (G, C) bool: j < n_i


def prefix_attention(module, query, key, value, attention_mask, packed_layout=None, **kwargs):
    """Transformers' SDPA attention, except while sampling answers to a prompt held once
    (`module.shared_prefix`: shared_prefix_attention) and on a packed row [prompt; c_1 ... c_G] (`packed_layout`):
    there two SDPA calls compute exactly the pairs the row's rule allows. The prompt attends causally
    to itself (is_causal). The completions, gathered into a (G, C) batch, attend to [prompt; own
    tokens] with a (C, Lp + C) mask: token j sees the prompt and tokens <= j, never another completion.
    No (T, T) mask, no work on pairs between completions. The cost: the prompt's keys and values are
    copied G times per layer while it runs (the 7B: 8 x 28 heads x 4.2K x 128 in bf16, 0.24 GB each).
    On a GPU the first call can take a flash kernel, the second a masked (memory-efficient) one; only
    a GPU can check which kernels it picks and their speed. query (1, H, T, d), key and value
    (1, H_kv, T, d) -> ((1, T, H, d), None), as SDPA's."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    if getattr(module, "shared_prefix", None) is not None:  # sampling G answers to each prompt (generate_shared)
        return shared_prefix_attention(module, query, key, value, attention_mask, module.shared_prefix,
                                       kwargs.get("scaling"))
    if packed_layout is None:  # every other forward: generate, eval, the plain update
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    Lp, rows, valid = packed_layout.prompt_len, packed_layout.rows, packed_layout.valid
    (G, C), n_rep = rows.shape, module.num_key_value_groups
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # (1, H, T, d)
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, scale=kwargs.get("scaling"),
                             dropout_p=kwargs.get("dropout", 0.0))
    prompt = sdpa(query[:, :, :Lp], key[:, :, :Lp], value[:, :, :Lp], is_causal=True)  # (1, H, Lp, d)
    gather = lambda x: x[0][:, rows].transpose(0, 1)  # noqa: E731  (1, H, T, d) -> (G, H, C, d)
    see = lambda x: torch.cat([x[:, :, :Lp].expand(G, -1, -1, -1), gather(x)], 2)  # noqa: E731  (G, H, Lp + C, d)
    allowed = torch.ones(C, Lp + C, dtype=torch.bool, device=rows.device).tril(Lp)  # j sees keys <= Lp + j
    completions = sdpa(gather(query), see(key), see(value), attn_mask=allowed)  # (G, H, C, d)
    # the valid tokens in (G, C) order are the row's order after the prompt
    out = torch.cat([prompt[0], completions.transpose(0, 1)[:, valid]], 1)  # (H, T, d)
    return out.transpose(0, 1)[None].contiguous(), None


def use_prefix_attention(model) -> None:
    """Run the text model's attention through `prefix_attention` (the vision tower keeps its own).
    Every forward without a `packed_layout` (generate, eval) is plain SDPA, with SDPA's masks."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
    AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)
    model.set_attn_implementation({"text_config": PREFIX_ATTENTION})


def _predictors(first, starts, n) -> torch.Tensor:
    """Row indices (N,) of the hidden states that predict each completion token, completion by
    completion: token 0 of completion i from `first[i]`, token j > 0 from `starts[i] + j - 1`."""
    return torch.cat([torch.cat([first[i:i + 1], starts[i] + torch.arange(int(n[i]) - 1, device=n.device)])[:int(n[i])]
                      for i in range(len(n))])


def packed_inputs(model, prompt: dict, ids: torch.Tensor, n: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """-> (forward kwargs of the row [prompt; ids[0, :n_0] ... ids[G-1, :n_G-1]] of T = Lp + sum(n)
    tokens, (N,) row indices of the states that predict each completion token).

    Positions (3, 1, T): the prompt's own 3-D positions (`get_rope_index` on the prompt alone: the
    text after the video resumes after its last position); every completion continues from the
    prompt's last position + 1, exactly as it would in its own row [prompt; c_i]. Attention: see
    `prefix_attention` (the model must `use_prefix_attention`)."""
    assert model.config.text_config._attn_implementation == PREFIX_ATTENTION, \
        "a packed row needs model.use_prefix_attention(model) (plain SDPA would let completions see each other)"
    dev, Lp = ids.device, prompt["input_ids"].shape[1]
    pos, _ = model.model.get_rope_index(prompt["input_ids"], prompt["mm_token_type_ids"],
                                        video_grid_thw=prompt["video_grid_thw"],
                                        second_per_grid_ts=prompt["second_per_grid_ts"])  # (3, 1, Lp)
    after = pos[:, 0, -1:] + 1  # (3, 1): the prompt ends in text, so its three rows agree
    lens = [int(k) for k in n]
    starts = Lp + torch.cumsum(n, 0) - n  # where each completion starts in the row
    j = torch.arange(max(lens), device=dev)
    valid = j < n[:, None]  # (G, C)
    inputs = {"input_ids": torch.cat([prompt["input_ids"][0]] + [ids[i, :k] for i, k in enumerate(lens)])[None],
              "position_ids": torch.cat([pos[:, 0]] + [after + torch.arange(k, device=dev) for k in lens], 1)[:, None],
              "packed_layout": PackedLayout(Lp, torch.where(valid, starts[:, None] + j, 0), valid),
              "pixel_values_videos": prompt["pixel_values_videos"], "video_grid_thw": prompt["video_grid_thw"]}
    return inputs, _predictors(torch.full_like(n, Lp - 1), starts, n)


def plain_inputs(model, prompt: dict, ids: torch.Tensor, mask: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """-> (forward kwargs of G rows [prompt; c_i] (padded to Lc), (N,) indices into the flattened
    (G * (Lp + Lc)) states that predict each completion token). The video is encoded once and its
    features reused for the G rows (with gradient)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    (G, Lc), Lp = ids.shape, prompt["input_ids"].shape[1]
    feats = model.get_video_features(prompt["pixel_values_videos"], prompt["video_grid_thw"]).pooler_output
    video = BaseModelOutputWithPooling(pooler_output=tuple(feats) * G)  # G references, one encode
    inputs = {"input_ids": torch.cat([prompt["input_ids"].expand(G, -1), ids], 1),
              "attention_mask": torch.cat([torch.ones(G, Lp, dtype=torch.long, device=ids.device), mask.long()], 1),
              "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"].expand(G, -1), torch.zeros_like(ids)], 1),
              "video_grid_thw": prompt["video_grid_thw"].repeat(G, 1),
              "second_per_grid_ts": prompt["second_per_grid_ts"].repeat(G), "mm_encoder_outputs": {"video": video}}
    starts = torch.arange(G, device=ids.device) * (Lp + Lc) + Lp
    return inputs, _predictors(starts - 1, starts, mask.sum(1).long())


def token_logprobs(lm_head, hidden, targets, temperature: float, suppress=None, with_entropy=False,
                   chunk: int = LOGIT_CHUNK):
    """(N, h) final hidden states and (N,) target ids -> (N,) log-probs of the targets under
    softmax(lm_head(hidden) / temperature) and (N,) entropies (None without `with_entropy`).
    `suppress`: ids removed from the distribution (p = 0), as generate never samples them.

    Memory: `chunk` positions at a time, each under activation checkpointing, so the float32 logits of
    a chunk are freed after its forward and recomputed in backward: the (N, V) logits never exist."""
    from torch.utils.checkpoint import checkpoint

    def piece(h, y):
        logits = lm_head(h).float() / temperature  # (n, V)
        if suppress:
            logits[:, suppress] = float("-inf")
        logp_all = logits.log_softmax(-1)
        logp = logp_all.gather(-1, y[:, None]).squeeze(-1)
        if not with_entropy:
            return logp, None
        # suppressed ids have p = 0 and logp = -inf: 0 * -inf would be NaN
        return logp, -(logp_all.exp() * logp_all.where(logp_all.isfinite(), 0.0)).sum(-1)

    grad = torch.is_grad_enabled() and hidden.requires_grad
    outs = [checkpoint(piece, hidden[a:a + chunk], targets[a:a + chunk], use_reentrant=False) if grad
            else piece(hidden[a:a + chunk], targets[a:a + chunk]) for a in range(0, len(targets), chunk)]
    logp = torch.cat([o[0] for o in outs])
    return logp, torch.cat([o[1] for o in outs]) if with_entropy else None


def completion_logprobs(model, prompt: dict, ids, mask, temperature: float, suppress=None, with_entropy=False,
                        packed=True, forward=None, chunk: int = LOGIT_CHUNK):
    """Per-token log-probs (G, Lc) of G completions `ids` of ONE prompt (and entropies, or None), 0
    where `mask` is 0. The mask is a prefix of each row (grpo.completion_mask). `prompt`: one prompt's
    inputs, no padding (grpo.prompt_inputs). `forward` runs the model (the DeepSpeed engine when
    training: its forward hooks set up engine.backward); `model` is the module itself.

    The forward keeps one logit (logits_to_keep=1) and returns the final hidden states; log-probs are
    computed from the states that predict completion tokens only, in chunks (`token_logprobs`)."""
    G, Lc = ids.shape
    n = mask.sum(1).long()  # completion lengths
    assert torch.equal(mask.bool(), torch.arange(Lc, device=ids.device) < n[:, None]), "mask must be a prefix"
    inputs, at = packed_inputs(model, prompt, ids, n) if packed else plain_inputs(model, prompt, ids, mask)
    out = (forward or model)(**inputs, logits_to_keep=1, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1].flatten(0, 1)[at]  # (N, h), N = mask.sum(); the last state is normed
    logp, ent = token_logprobs(model.lm_head, hidden, ids[mask.bool()], temperature, suppress, with_entropy, chunk)
    full = lambda x: torch.zeros(G, Lc, dtype=x.dtype, device=x.device).masked_scatter(mask.bool(), x)  # noqa: E731
    return full(logp), full(ent) if with_entropy else None


# -----------------------------------------------------------------------------
# Rollouts (grpo.py): G answers per prompt, the video encoded once and the prompt prefilled once


def prompt_inputs(batch, i: int) -> dict:
    """Prompt i of a left-padded build_inputs batch, padding removed (one video per prompt)."""
    keep = batch["attention_mask"][i].bool()
    patches = batch["video_grid_thw"].prod(-1)  # rows of pixel_values_videos per video
    start = int(patches[:i].sum())
    return {"input_ids": batch["input_ids"][i, keep][None],
            "mm_token_type_ids": batch["mm_token_type_ids"][i, keep][None],
            "pixel_values_videos": batch["pixel_values_videos"][start:start + int(patches[i])],
            "video_grid_thw": batch["video_grid_thw"][i:i + 1],
            "second_per_grid_ts": batch["second_per_grid_ts"][i:i + 1]}


@dataclass
class SharedPrefix:
    """One layer's prompt keys and values, one float32 copy per prompt (P, H_kv, Lpre, d), that the G
    answers to each prompt attend to while they are sampled (generate_shared). Set on the layer's
    attention module for the generate call only: generate refuses kwargs the model's forward does not
    name, so it cannot travel as PackedLayout does in training."""
    keys: torch.Tensor
    values: torch.Tensor


def _suffix_layer(prefix_len: int):
    """A DynamicLayer for the tokens after a shared prefix of `prefix_len` tokens: it stores only them,
    and counts the prefix in its length (so generate's positions and masks are those of the whole row)."""
    from transformers.cache_utils import DynamicLayer

    class SuffixLayer(DynamicLayer):
        def get_seq_length(self) -> int:
            return prefix_len + super().get_seq_length()
    return SuffixLayer()


def shared_prefix_attention(module, query, key, value, attention_mask, prefix: SharedPrefix, scaling=None):
    """Attention of B = P x G rows, each [prompt p; own tokens], where the prompt's keys and values are
    held once per prompt (`prefix`) and `key`, `value` hold only the rows' own tokens (B, H_kv, t, d).
    The scores against the prompt are one matmul per prompt and key head, its G x n_rep x q queries
    as rows: the prompt's keys are read once, not copied G times into the cache and read G times (the
    plain cache's cost while sampling, ~1/3 of a CPU rollout in bench.py's setting). In float32, as a
    fused kernel accumulates. attention_mask: SDPA's, over the whole row
    (B, 1, q, Lpre + t), True or 0 where allowed, or None (every key allowed; with q > 1, causal).
    -> ((B, q, H, d), None), as SDPA's."""
    pk, pv = prefix.keys, prefix.values
    (B, H, q, d), (P, Hkv, Lpre, _), t = query.shape, pk.shape, key.shape[2]
    G, n_rep = B // P, H // Hkv
    scaling = d ** -0.5 if scaling is None else scaling

    def by_prompt(x):  # (B, H, q, n) -> (P, H_kv, G * n_rep * q, n): a prompt's queries as rows
        return x.reshape(P, G, Hkv, n_rep, q, -1).transpose(1, 2).reshape(P, Hkv, G * n_rep * q, -1)

    def by_row(x):  # the inverse
        return x.reshape(P, Hkv, G, n_rep, q, -1).transpose(1, 2).reshape(B, H, q, -1)

    def by_key_head(x):  # (B, H, q, n) -> (B, H_kv, n_rep * q, n), a view: head h reads key head h // n_rep
        return x.reshape(B, Hkv, n_rep * q, -1)

    # float32 throughout (the prefix is stored so): bf16 scores would round a logit of 20 to steps of 0.125
    dtype, query = query.dtype, query.float()
    own_k, own_v = key.float(), value.float()  # (B, H_kv, t, d): t is the answer so far
    scores = torch.cat([by_row(by_prompt(query) @ pk.transpose(-1, -2)),
                        (by_key_head(query) @ own_k.transpose(-1, -2)).reshape(B, H, q, t)], -1)
    scores = scores * scaling  # (B, H, q, Lpre + t)
    if attention_mask is None and q > 1:  # query i is the row's token Lpre + t - q + i
        attention_mask = torch.ones(q, Lpre + t, dtype=torch.bool, device=query.device).tril(Lpre + t - q)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
    w = scores.softmax(-1)
    out = by_row(by_prompt(w[..., :Lpre]) @ pv) + (by_key_head(w[..., Lpre:]) @ own_v).reshape(B, H, q, d)
    return out.to(dtype).transpose(1, 2).contiguous(), None


@torch.no_grad()
def generate_shared(model, batch, G: int, gen_kwargs: dict, shared_decode: bool = True, prefixes=None,
                    pad_id: int = 0) -> torch.Tensor:
    """Sample G answers for each prompt of a left-padded batch: (P * G, Lc) new ids, grouped by prompt.
    The vision encoder and the prompt prefill run once per prompt. While sampling, the prompt's keys
    and values stay one copy per prompt (SharedPrefix, shared_prefix_attention) when the model's text
    attention is prefix_attention (use_prefix_attention; grpo.py's); else, or with shared_decode=False,
    the cache is repeated G times.

    `prefixes` (P * G lists of token ids, grouped by prompt): the start each answer continues from
    (TaRO's guided rollouts, generate_from_prefixes; [] for a free one). The prompt is still prefilled
    once; row i continues it with [pad; prompt's last token; prefix_i], padded to the longest prefix.
    The pads are masked out, and Qwen2.5-VL's positions during generation come from the attention
    mask's running count plus the prompt's rope delta, so the prefix sits exactly where it would right
    after the prompt. Only the tokens after the prefix are returned."""
    cache = model(**batch, use_cache=True, logits_to_keep=1).past_key_values  # (P, ...) prefill, video encoded once
    attention = [layer.self_attn for layer in model.model.language_model.layers]
    if shared_decode and model.config.get_text_config()._attn_implementation == PREFIX_ATTENTION:
        from transformers import DynamicCache
        Lpre = batch["input_ids"].shape[1] - 1  # generate must see one uncached token to produce the first logits
        for module, layer in zip(attention, cache.layers):
            # float32: for the 7B's 4.2K-token prompt 0.48 GB a prompt, against 1.9 GB for G = 8 bf16 copies
            module.shared_prefix = SharedPrefix(layer.keys[:, :, :Lpre].float(), layer.values[:, :, :Lpre].float())
        cache = DynamicCache()
        cache.layers = [_suffix_layer(Lpre) for _ in attention]
    else:
        cache.batch_repeat_interleave(G)
        cache.crop(-1)  # generate must see one uncached token to produce the first logits
    # Continuing from a cache, generate places new tokens at (token index + model.model.rope_deltas).
    # The prefill set rope_deltas (P, 1) from the prompt's real positions (model.get_rope_index: the
    # text resumes after the video's last position); the G copies of a prompt share it.
    model.model.rope_deltas = model.model.rope_deltas.repeat_interleave(G, 0)  # (P * G, 1)
    ids, mask = batch["input_ids"].repeat_interleave(G, 0), batch["attention_mask"].repeat_interleave(G, 0)
    if prefixes is not None:
        # Row i becomes [prompt[:-1]; pad; prompt[-1]; prefix_i]: it ends in a real token, whose logits
        # the first sample is drawn from (a free row ending in a pad would sample from the pad's).
        assert len(prefixes) == len(ids), f"{len(prefixes)} prefixes for {len(ids)} rows"
        tail = torch.full((len(ids), 1 + max(map(len, prefixes))), pad_id, dtype=ids.dtype, device=ids.device)
        seen = torch.zeros_like(tail, dtype=mask.dtype)
        for i, p in enumerate(prefixes):
            tail[i, -1 - len(p):] = torch.cat([ids[i, -1:], torch.tensor(p, dtype=ids.dtype, device=ids.device)])
            seen[i, -1 - len(p):] = 1
        ids, mask = torch.cat([ids[:, :-1], tail], 1), torch.cat([mask[:, :-1], seen], 1)
    try:
        seqs = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **gen_kwargs)
    finally:
        for module in attention:
            module.shared_prefix = None
    return seqs[:, ids.shape[1]:]


def to_device(d: dict, device) -> dict:
    """A dict of model inputs (build_inputs' BatchFeature) with its tensors on `device`."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in d.items()}


@torch.no_grad()
def generate_from_prefixes(model, batch, G: int, prefixes: list[list[int]], gen_kwargs: dict, pad_id: int,
                           max_len: int, shared_decode: bool = True) -> torch.Tensor:
    """G answers to each prompt of a left-padded batch, answer i continuing from its own prefix of token
    ids (P * G lists, grouped by prompt: TaRO's guided rollouts; [] for a free one) -> (P * G, max_len)
    ids: prefix + sampled tokens, cut at `max_len` tokens in all (so a long prefix never pushes the
    answer past the response limit, a flaw of TaRO's released code), right-padded with pad_id.
    The video is encoded and the prompt prefilled once per prompt, as for free rollouts
    (generate_shared with `prefixes`)."""
    new = generate_shared(model, batch, G, gen_kwargs, shared_decode, prefixes, pad_id)
    out = torch.full((len(prefixes), max_len), pad_id, dtype=torch.long, device=new.device)
    for i, p in enumerate(prefixes):
        row = torch.cat([torch.tensor(p, dtype=torch.long, device=new.device), new[i]])[:max_len]
        out[i, :len(row)] = row
    return out


# -----------------------------------------------------------------------------
# Distributed training: one DeepSpeed path for 1 CPU process and for 16 GPUs (sft.py, grpo.py)


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) without a launcher."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def print0(*a, **kw):
    if dist_env()[0] == 0:
        print(*a, **kw, flush=True)


def init_distributed() -> torch.device:
    """Start torch.distributed through DeepSpeed (nccl on GPU, gloo on CPU) and return this rank's
    device. Without a launcher we become a world of one, so the same DeepSpeed code path runs."""
    import deepspeed
    if "RANK" not in os.environ:  # plain `python script.py`: a single-process group on a free port
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env()[2])
        deepspeed.init_distributed(dist_backend="nccl")
        return torch.device("cuda", dist_env()[2])
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed.init_distributed(dist_backend="gloo")
    return torch.device("cpu")


def check_shared_dir(path: str, device, wait: float = 10.0) -> None:
    """Stop every rank, with a message, unless all of them see the same `path` (call after
    init_distributed). Rank 0 writes the checkpoints and every rank reads them on resume, so a
    multi-node run needs --out on a filesystem all nodes share; a node-local --out would otherwise
    show up hours later as a hang or a resume from different weights. Rank 0 writes a random token
    there, every rank reads it back (retrying for `wait` seconds: a network filesystem may show a new
    file late), and all agree."""
    import secrets
    import socket
    import time
    import torch.distributed as dist
    rank = dist.get_rank()
    token = torch.zeros(1, dtype=torch.int64, device=device)  # on the device: NCCL takes CUDA tensors only
    probe = os.path.join(path, ".rank_check")
    if rank == 0:
        token[0] = secrets.randbits(62)
        os.makedirs(path, exist_ok=True)
        with open(probe + ".tmp", "w") as f:
            f.write(str(int(token)))
        os.replace(probe + ".tmp", probe)
    dist.broadcast(token, 0)
    seen = None
    deadline = time.time() + wait
    while True:
        try:
            with open(probe) as f:
                seen = int(f.read())
        except (OSError, ValueError):
            seen = None
        if seen == int(token) or time.time() > deadline:
            break
        time.sleep(0.5)
    bad = torch.tensor([int(seen != int(token))], dtype=torch.int64, device=device)
    dist.all_reduce(bad)
    if bad.item():
        if seen != int(token):
            print(f"error: rank {rank} on {socket.gethostname()} does not see rank 0's {probe}: --out must be "
                  "a directory every node shares (rank 0 writes the checkpoints; every rank reads them on resume)",
                  file=sys.stderr, flush=True)
        dist.destroy_process_group()
        sys.exit(1)


def ds_config(micro_batch: int, grad_accum: int, zero_stage: int, lr: float, bf16: bool,
              grad_clip: float = 1.0, weight_decay: float = 0.0, small_model: bool = False,
              world: int | None = None) -> dict:
    """The DeepSpeed config, derived from the script's own flags (one source of truth for sizes).
    The learning-rate schedule is applied by the script itself each step. `world` defaults to the
    launcher's world size (a dry run passes the planned one)."""
    world = world or dist_env()[1]
    zero = {"stage": zero_stage}
    if zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, overlap_comm=False)
        if small_model:  # below the default threshold nothing would be partitioned at all
            zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": micro_batch * grad_accum * world,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # torch's AdamW: DeepSpeed's fused CPU Adam would JIT-compile for 30 s first.
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": weight_decay, "torch_adam": True}},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def load_for_training(path: str, ds_cfg: dict, dtype: torch.dtype):
    """Load weights the ZeRO-3 way: with an HfDeepSpeedConfig alive, from_pretrained partitions each
    tensor as it loads, so no rank ever holds the full 7B. Returns (model, keepalive)."""
    keep = None
    if ds_cfg["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig
        keep = HfDeepSpeedConfig(ds_cfg)  # must stay referenced while the model is built
    return load_model(path, dtype), keep


def optimizer_step(engine, loss_finite: bool) -> bool:
    """engine.step() at a gradient accumulation boundary, applied only when the step is sound on EVERY
    rank: each rank's loss finite (`loss_finite`, over its micro-batches of the step) and the gradients
    finite. Returns True when the weights were updated. Otherwise no rank updates, the accumulated
    gradients are dropped (none leaks into the next step) and the optimizer's state is untouched.

    A NaN or inf loss makes its gradients NaN or inf, and DeepSpeed's reduction of the gradients spreads
    them to every rank. DeepSpeed's own optimizers (ZeRO 1-3, bf16) then skip the step by themselves
    (DeepSpeed 0.19.8): their gradient norm is not finite, and their `overflow` path, the one fp16 loss
    scaling uses, drops the accumulated gradients. A plain torch optimizer (ZeRO-0 in fp32) has no such
    check: there the gradients, whole on every rank after the boundary's all-reduce, are checked here.
    The decision is all-reduced so that every rank takes the same branch (a rank that stepped alone
    would leave the others' weights behind)."""
    import torch.distributed as dist
    plain = not hasattr(engine.optimizer, "overflow")  # DeepSpeed's optimizers have it, torch's do not
    bad = torch.tensor([0.0 if loss_finite else 1.0], device=engine.device)  # on the device: NCCL
    if plain and not bad.item():
        bad[0] = float(any(p.grad is not None and not torch.isfinite(p.grad).all() for p in engine.module.parameters()))
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() and plain:
        # HACK: DeepSpeed has no way to skip a step of a plain torch optimizer, so engine.step() runs with
        # the optimizer's own step() a no-op, this once: DeepSpeed's bookkeeping advances (its step
        # counters decide where the next accumulation boundary is), it drops the gradients as after any
        # step (zero_grad), and no weight and no Adam moment changes.
        engine.optimizer.step = lambda *args, **kwargs: None
        try:
            engine.step()
        finally:
            del engine.optimizer.step  # the class's step() again
        return False
    engine.step()
    if bad.item() and engine.was_step_applied():  # cannot happen with DeepSpeed 0.19.8's optimizers
        raise RuntimeError("DeepSpeed applied an optimizer step whose loss or gradients were not finite")
    return not bad.item() and engine.was_step_applied()


def freeze_vision(model) -> int:
    """Freeze the vision tower (`model.visual`: the ViT and its patch merger); returns the number of
    frozen parameters. For the tiny preset: a randomly initialised ViT trained from scratch on a few
    thousand SFT samples collapses to one constant vector for every video token (measured: token-to-background
    distance falls from 0.2-0.8 of the norm to 0.01), so the language model can no longer see the
    video. Kept fixed, the random ViT is a rich feature extractor (a linear probe reads the shape's
    colour from it at 91% held out). Qwen's own fine-tuning scripts freeze the ViT by default too; the
    paper preset trains everything, as the paper does."""
    visual = model.model.visual
    visual.requires_grad_(False)
    return sum(p.numel() for p in visual.parameters())


def _rng_state() -> dict:
    import random
    import numpy as np
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    import random
    import numpy as np
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save_hf(engine, processor, out: str) -> None:
    """Consolidate the (possibly ZeRO-3 partitioned) weights and save_pretrained them, atomically:
    the directory appears complete or not at all. Every rank must call this (ZeRO-3 gathers)."""
    import shutil
    import torch.distributed as dist
    rank = dist_env()[0]
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()  # gathers every shard on rank 0
    else:
        sd = engine.module.state_dict()
    if rank == 0:
        tmp = out.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # Under ZeRO-3, from_pretrained also records transformers' legacy renamings, and reverting them
        # on save writes non-canonical keys (`model.model.*`); drop them to save Qwen's own key names.
        engine.module.__dict__.pop("_weight_conversions", None)
        engine.module.save_pretrained(tmp, state_dict=sd)
        processor.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    dist.barrier()


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota); the message names it and the last
    complete checkpoint, which --resume continues from."""


def save_checkpoint(engine, processor, out_dir: str, step: int, state: dict, keep: int = 2) -> str:
    """OUT/checkpoint-STEP/: HF weights (loadable by from_pretrained, grpo.py, eval.py), DeepSpeed's
    optimizer and engine state in ds/, each rank's RNG, and trainer_state.json (step, config, data
    position) written LAST: a directory without it is incomplete and never resumed from. A write that
    fails (a full disk) raises CheckpointError; the older checkpoints are only pruned after a new one
    is complete, so the last complete one stays."""
    import shutil
    import torch.distributed as dist
    rank = dist_env()[0]
    ckpt = os.path.join(out_dir, f"checkpoint-{step:06d}")
    if rank == 0:
        shutil.rmtree(ckpt, ignore_errors=True)  # a half-written one from a killed run
    dist.barrier()
    try:
        save_hf(engine, processor, ckpt)
        engine.save_checkpoint(os.path.join(ckpt, "ds"), tag="state")
        torch.save(_rng_state(), os.path.join(ckpt, f"rng_rank{rank}.pt"))
        dist.barrier()
        if rank == 0:
            tmp = os.path.join(ckpt, "trainer_state.json.tmp")
            with open(tmp, "w") as f:
                json.dump(dict(state, step=step), f, indent=1)
            os.replace(tmp, os.path.join(ckpt, "trainer_state.json"))
    except Exception as e:  # torch.save and safetensors name neither the file nor, often, the reason
        for partial in (ckpt, ckpt + ".tmp"):  # free what the failed write took; it is never resumed from
            shutil.rmtree(partial, ignore_errors=True)
        free = shutil.disk_usage(out_dir).free / 2**20  # torch.save's "unexpected pos" means a full disk
        raise CheckpointError(f"could not write the checkpoint {ckpt} ({free:.1f} MiB free on its disk): "
                              f"{type(e).__name__}: {e}. The last complete checkpoint is "
                              f"{latest_checkpoint(out_dir) or '(none)'}: make room and run again with --resume to "
                              "continue from it") from e
    if rank == 0:
        # keep the newest `keep` complete checkpoints; older ones, and half-written leftovers older
        # than this one (killed runs), go
        names = sorted(d for d in os.listdir(out_dir) if d.startswith("checkpoint-"))
        complete = [d for d in names if os.path.isfile(os.path.join(out_dir, d, "trainer_state.json"))]
        stale = complete[:-keep] + [d for d in names if d not in complete and d < os.path.basename(ckpt)]
        for old in stale:
            shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    dist.barrier()
    return ckpt


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest COMPLETE checkpoint (one with trainer_state.json), or None."""
    if not os.path.isdir(out_dir):
        return None
    done = sorted(d for d in os.listdir(out_dir) if d.startswith("checkpoint-")
                  and os.path.isfile(os.path.join(out_dir, d, "trainer_state.json")))
    return os.path.join(out_dir, done[-1]) if done else None


def keep_steps_upto(path: str, last: int) -> None:
    """A killed run may have logged steps after its last checkpoint: keep the JSONL records of steps
    <= `last` only (atomic rewrite), so a resumed run logs no step twice. A kill in the middle of an
    append leaves a torn last line (no newline after it): it goes too, and its step is logged again.
    Any other line that is not a record raises, naming its file:line."""
    if not os.path.isfile(path):
        return
    from data import file_lines, json_line
    keep = [line for where, line in file_lines(path, complete_only=True) if json_line(line, where)["step"] <= last]
    with open(path + ".tmp", "wb") as f:
        f.writelines(line + b"\n" for line in keep)
    os.replace(path + ".tmp", path)


def load_checkpoint(engine, ckpt: str) -> dict:
    """Restore weights, optimizer and engine state, this rank's RNG; return trainer_state.json."""
    engine.load_checkpoint(os.path.join(ckpt, "ds"), tag="state")
    rng = os.path.join(ckpt, f"rng_rank{dist_env()[0]}.pt")
    if os.path.isfile(rng):  # absent if the world size changed: then RNG streams simply restart
        _set_rng_state(torch.load(rng, weights_only=False))
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# The tiny model, built offline


def _tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: the prompt, the answer format, the synthetic task's words and
    numbers. Anything else still tokenizes (byte-level), just into more pieces."""
    from data import SYSTEM_PROMPT, synth_vocabulary
    lines = [SYSTEM_PROMPT] * 4 + synth_vocabulary() * 4
    lines += [f"From {i}.{j} s to {i + j}.{i} s" for i in range(40) for j in range(10)]
    lines += [f"<think>{w}</think> <time>[{i}.{j}, {i + j}.{i}]</time>" for i in range(40) for j in range(10)
              for w in ("a", "the")]
    return lines


def build_tiny(out: str, hidden: int = 128, layers: int = 4, heads: int = 4, vision_hidden: int = 64,
               vision_depth: int = 2, merges: int = 400, seed: int = 0) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    from data import MAX_PIXELS, MIN_PIXELS

    # Tokenizer: a small byte-level BPE with Qwen's pre-tokenizer (digits split one by one, as in Qwen).
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    n_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(vocab_size=n_bytes + merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    state = json.loads(bpe.to_str())["model"]
    merges_list = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    vocab = dict(state["vocab"])
    for t in SPECIAL_TOKENS:  # appended after the BPE vocabulary, in Qwen's order
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges_list, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=SPECIAL_TOKENS[1:])
    tok.chat_template = CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    # Processor: the real Qwen2-VL image and video processors (patch 14, merge 2, temporal patch 2).
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tok, chat_template=CHAT_TEMPLATE)

    # Config: the 7B's structure at toy width. mrope_section must sum to head_dim / 2.
    # The 7B's split of the rotary frequencies (16, 24, 24 of 64) scaled down: a quarter for time.
    half = hidden // heads // 2
    hw = half * 3 // 4 // 2
    mrope = [half - 2 * hw, hw, hw]
    assert min(mrope) >= 1 and sum(mrope) == half, f"hidden {hidden} / heads {heads} is too small for 3-D rope"
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                           num_heads=max(1, vision_hidden // 16), out_hidden_size=hidden, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=list(range(vision_depth)), tokens_per_second=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny Qwen2.5-VL: {n:,} parameters, vocab {len(vocab)}, hidden {hidden} x {layers} layers, "
          f"vision {vision_hidden} x {vision_depth} -> {out}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny", help="build a tiny random Qwen2.5-VL offline and save it")
    t.add_argument("--out", required=True, help="output directory (save_pretrained format)")
    t.add_argument("--hidden", type=int, default=128, help="language model width")
    t.add_argument("--layers", type=int, default=4, help="language model depth")
    t.add_argument("--heads", type=int, default=4, help="attention heads (KV heads = heads / 2)")
    t.add_argument("--vision-hidden", type=int, default=64, help="vision tower width")
    t.add_argument("--vision-depth", type=int, default=2, help="vision tower depth")
    t.add_argument("--seed", type=int, default=0, help="weight init seed")
    i = sub.add_parser("info", help="print the parameter count of a model (config only with --meta)")
    i.add_argument("--model", required=True, help="directory or hub id, or a config.json with --meta")
    i.add_argument("--meta", action="store_true", help="build on the meta device: no weights are loaded")
    a = ap.parse_args()
    if a.cmd == "tiny":
        build_tiny(a.out, a.hidden, a.layers, a.heads, a.vision_hidden, a.vision_depth, seed=a.seed)
    else:
        from transformers import AutoConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        if a.meta:
            cfg = (Qwen2_5_VLConfig.from_json_file(a.model) if a.model.endswith(".json")
                   else AutoConfig.from_pretrained(a.model))
            with torch.device("meta"):
                m = Qwen2_5_VLForConditionalGeneration(cfg)
        else:
            m = load_model(a.model)
        n = sum(p.numel() for p in m.parameters())
        nv = sum(p.numel() for p in m.model.visual.parameters())
        print(f"{a.model}: {n:,} parameters (language model {n - nv:,}; vision {nv:,})")


if __name__ == "__main__":
    main()
