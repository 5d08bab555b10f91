"""A LLaMa in one file, read top to bottom: config, blocks, attention (fast and eager), cache, loss, load, save.

It runs exactly the model in a Hugging Face LLaMa checkpoint (``config.json`` + safetensors), with the RoPE
variant of ``ropelite.rope`` asked for. Parameter names are Hugging Face's without the leading ``model.``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .errors import RopeliteError
from .io import atomic_path, write_json
from .rope import RopeConfig, apply_rope, ntk_base, rope_cos_sin

# Hugging Face rope_type <-> ours. transformers has no fixed-base NTK: it is a plain rope_theta there.
_FROM_HF_ROPE = {"default": "rope", "linear": "pi", "dynamic": "dynamic", "yarn": "yarn", "llama3": "llama3",
                 "longrope": "longrope", "su": "longrope"}
_TO_HF_ROPE = {"pi": "linear", "dynamic": "dynamic", "yarn": "yarn", "llama3": "llama3", "longrope": "longrope"}
_ROPE_KEYS = ("beta_fast", "beta_slow", "truncate", "attention_factor", "mscale", "mscale_all_dim",
              "low_freq_factor", "high_freq_factor", "short_factor", "long_factor")
# The rope_scaling keys of each type, written even at their defaults: transformers requires some
# (llama3's low/high_freq_factor) and warns about keys that belong to another type.
_HF_KEYS = {"yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"),
            "llama3": ("low_freq_factor", "high_freq_factor"),
            "longrope": ("short_factor", "long_factor", "attention_factor")}

# One observed attention row block: (layer index, absolute query positions (t,), probabilities (B, H, t, S)).
AttentionCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------

@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """Read a transformers ``config.json`` dict: 4.x (``rope_theta`` + ``rope_scaling``) or 5.x
        (``rope_parameters``), plus our own ``ropelite`` record of a fixed-base NTK."""
        if d.get("model_type") != "llama" and "LlamaForCausalLM" not in d.get("architectures", []):
            raise RopeliteError(f"unsupported architecture '{d.get('model_type')}': ropelite runs LLaMa models")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise RopeliteError(f"config sets {flag}=true, which ropelite's LLaMa does not implement")
        try:
            heads = d["num_attention_heads"]
            rope = _rope_from_hf(d)
            return cls(
                vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                rms_norm_eps=d.get("rms_norm_eps", 1e-5),
                max_position_embeddings=d.get("max_position_embeddings", 4096),
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), rope=rope)
        except KeyError as e:
            raise RopeliteError(f"config.json lacks the key {e}") from None

    def to_hf(self) -> dict:
        """A ``config.json`` that transformers (4.x and 5.x) loads as the same model with the same RoPE."""
        r = self.rope
        d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
             "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
             "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
             "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
             "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
             "attention_bias": False, "mlp_bias": False, "bos_token_id": self.bos_token_id,
             "eos_token_id": self.eos_token_id, "rope_theta": r.theta, "rope_scaling": None,
             "max_position_embeddings": r.original_max_position_embeddings}
        if r.type == "ntk":
            d["rope_theta"] = r.base if r.base is not None else ntk_base(self.head_dim, r.theta, r.factor)
        elif r.type != "rope":
            scaling = {"rope_type": _TO_HF_ROPE[r.type], "type": _TO_HF_ROPE[r.type], "factor": r.factor}
            if r.type in _HF_KEYS:  # linear has no L; dynamic takes it from max_position_embeddings
                scaling["original_max_position_embeddings"] = r.original_max_position_embeddings
            scaling.update({k: getattr(r, k) for k in _HF_KEYS.get(r.type, ()) if getattr(r, k) is not None})
            if not r.truncate:
                scaling["truncate"] = False
            d["rope_scaling"] = scaling
            if r.type != "dynamic":  # transformers reads the extended length as max_position_embeddings
                d["max_position_embeddings"] = int(r.original_max_position_embeddings * r.factor)
        # What transformers cannot say (a fixed-base NTK, the pretrained base) is recorded for ropelite.
        d["ropelite"] = {"rope": r.type, "factor": r.factor, "theta": r.theta, "base": r.base,
                         "original_max_position_embeddings": r.original_max_position_embeddings,
                         "max_position_embeddings": int(r.original_max_position_embeddings * r.factor)}
        return d

    def with_rope(self, rope: str | None = None, factor: float | None = None, **rope_kwargs) -> "LlamaConfig":
        """The same model with another RoPE variant. The pretrained base and length come from this config."""
        if rope is None and factor is None and not rope_kwargs:
            return self
        current = self.rope
        same = rope in (None, current.type)  # naming the checkpoint's own variant keeps its settings
        new = RopeConfig(type=rope or current.type, theta=current.theta,
                         factor=current.factor if factor is None else float(factor),
                         original_max_position_embeddings=current.original_max_position_embeddings,
                         **{**(_nondefault_extras(current) if same else {}), **rope_kwargs})
        return dataclasses.replace(self, rope=new)


def _nondefault_extras(rope: RopeConfig) -> dict:
    defaults = RopeConfig()
    return {k: getattr(rope, k) for k in (*_ROPE_KEYS, "base") if getattr(rope, k) != getattr(defaults, k)}


def _rope_from_hf(d: dict) -> RopeConfig:
    own = d.get("ropelite")
    params = dict(d.get("rope_parameters") or {})           # transformers 5.x
    scaling = dict(d.get("rope_scaling") or params)          # transformers 4.x
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = _FROM_HF_ROPE.get(scaling.get("rope_type") or scaling.get("type") or "default")
    if kind is None:
        raise RopeliteError(f"unsupported rope_scaling type '{scaling.get('rope_type') or scaling.get('type')}': "
                            f"ropelite reads {', '.join(_FROM_HF_ROPE)}")
    if own and own.get("rope") == "ntk":                     # rope_theta holds the NTK base; restore the story
        return RopeConfig(type="ntk", theta=own["theta"], factor=own["factor"], base=own["base"],
                          original_max_position_embeddings=own["original_max_position_embeddings"])
    max_len = d.get("max_position_embeddings", 4096)
    # transformers' dynamic scales from max_position_embeddings whatever rope_scaling says; Phi-3-style configs
    # keep the pretrained length at the top level.
    original = (max_len if kind == "dynamic" else
                d.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings") or max_len)
    if own:
        original = own["original_max_position_embeddings"]
    extras = {k: scaling[k] for k in _ROPE_KEYS if scaling.get(k) is not None}
    for k in ("short_factor", "long_factor"):
        if k in extras:
            extras[k] = tuple(extras[k])
    factor = scaling.get("factor")
    if factor is None:  # transformers: longrope without a factor scales by the ratio of the two lengths
        factor = max_len / original if kind == "longrope" else 1.0
    return RopeConfig(type=kind, theta=theta, factor=float(factor) if kind != "rope" else 1.0,
                      original_max_position_embeddings=int(original), **extras)


# --------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the mean square in float32 even for a bf16 model, as LLaMa does
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def attention_probs(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) with the causal mask, in float32.

    q (B, H, t, d) at absolute positions q_pos (t,); k (B, Hkv, S, d), keys at positions 0..S-1.
    Grouped-query attention: query head h reads key head h // (H / Hkv). Returns (B, H, t, S)."""
    B, H, t, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    # Scale q, not the (t, S) scores, and mask in place: two fewer passes over the largest tensor.
    qg = (q.float() * (1 / math.sqrt(d))).view(B, Hkv, H // Hkv, t, d)          # (B, Hkv, rep, t, d)
    scores = qg @ k.float().unsqueeze(2).transpose(-1, -2)                       # (B, Hkv, rep, t, S)
    future = torch.arange(S, device=q.device)[None, :] > q_pos[:, None]         # (t, S)
    return scores.masked_fill_(future, float("-inf")).softmax(-1).view(B, H, t, S)


class Observer:
    """What the caller wants to see of the attention: which query rows (absolute positions; None = all),
    delivered layer by layer to ``callback`` so that nothing O(L^2 * layers) is ever kept."""

    def __init__(self, callback: AttentionCallback, rows: torch.Tensor | None = None):
        self.callback, self.rows = callback, rows

    def select(self, q_pos: torch.Tensor) -> torch.Tensor:
        """Indices into q_pos of the rows asked for."""
        if self.rows is None:
            return torch.arange(len(q_pos), device=q_pos.device)
        return torch.nonzero(torch.isin(q_pos, self.rows.to(q_pos.device))).flatten()


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: "KVCache | None",
                eager: bool, observer: Observer | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)      # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)      # (B, Hkv, T, d)
        q = apply_rope(q, cos[-T:], sin[-T:])
        if cache is not None and cache.raw_keys:
            # Length-dependent RoPE: keys are cached unrotated and all rotated with today's frequencies
            # (rotating once and caching is transformers' stale-base bug #25104).
            k, v = cache.update(self.layer, k, v)
            k = apply_rope(k, cos, sin)
        else:
            k = apply_rope(k, cos[-T:], sin[-T:])
            if cache is not None:
                k, v = cache.update(self.layer, k, v)
        S = k.shape[2]
        q_pos = torch.arange(S - T, S, device=x.device)
        if eager:
            out = self._eager(q, k, v, q_pos, observer)
        else:
            out = self._sdpa(q, k, v, q_pos)
            if observer is not None:
                rows = observer.select(q_pos)
                if len(rows):
                    observer.callback(self.layer, q_pos[rows], attention_probs(q[:, :, rows], k, q_pos[rows]))
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))                    # (B, T, H*d)

    @staticmethod
    def _sdpa(q, k, v, q_pos):
        T, S = q.shape[2], k.shape[2]
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        mask = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]            # (T, S), True = attend
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def _eager(self, q, k, v, q_pos, observer):
        """Softmax written out, a block of query rows at a time so memory stays O(rows * S * H)."""
        B, H, T, d = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        rows_per_block = max(1, (1 << 24) // (S * H * B))
        out = torch.empty_like(q)
        for start in range(0, T, rows_per_block):
            block = slice(start, start + rows_per_block)
            probs = attention_probs(q[:, :, block], k, q_pos[block])                 # (B, H, t, S)
            t = probs.shape[2]
            out[:, :, block] = (probs.view(B, Hkv, H // Hkv, t, S) @ v.float().unsqueeze(2)  # (B, Hkv, rep, t, d)
                                ).view(B, H, t, d).to(q.dtype)
            if observer is not None:
                rows = observer.select(q_pos[block])
                if len(rows):
                    observer.callback(self.layer, q_pos[block][rows], probs[:, :, rows])
        return out


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, cache=None, eager=False, observer=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, eager, observer)
        return x + self.mlp(self.post_attention_layernorm(x))


# --------------------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of the tokens seen so far, per layer. Keys are stored rotated for a fixed RoPE, and
    unrotated (``raw_keys``) for a length-dependent one, whose frequencies change as the sequence grows.

    Re-rotating fixes the attention logits, not the past: from layer 1 on, the cached keys and values of earlier
    tokens were produced by attention at the length those tokens were seen. So for dynamic/longrope a cached
    decode past L equals a full forward only for one layer, or when the frequencies have not changed since the
    prefill (longrope with the prefill already past L); otherwise it approximates it (the first token after a
    prefill is always exact). Measure long-context quality with full forwards."""

    def __init__(self, n_layers: int, raw_keys: bool):
        self.raw_keys = raw_keys
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def __len__(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)  # (B, Hkv, S, d)
        self.k[layer], self.v[layer] = k, v
        return k, v


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------

class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers, raw_keys=self.config.rope.length_dependent)

    def rope_tables(self, past: int, total: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (rows, d) for the new positions past..total-1, or for all 0..total-1 when the frequencies
        depend on the length (cached keys are re-rotated then). Frequencies use the full length ``total``."""
        inv_freq, attention_factor = self.config.rope.frequencies(self.config.head_dim, total)
        first = 0 if self.config.rope.length_dependent else past
        return rope_cos_sin(inv_freq, torch.arange(first, total, device=device), attention_factor)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None, eager: bool = False,
                      on_attention: AttentionCallback | None = None,
                      attention_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, C). See ``forward`` for the arguments."""
        past = len(cache) if cache is not None else 0
        cos, sin = self.rope_tables(past, past + input_ids.shape[1], input_ids.device)
        x = self.embed_tokens(input_ids)
        observer = None if on_attention is None else Observer(on_attention, attention_rows)
        for block in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)  # recompute activations in backward
            else:
                x = block(x, cos, sin, cache, eager, observer)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, eager: bool = False,
                on_attention: AttentionCallback | None = None, attention_rows: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with ``last_only``.

        cache: a ``new_cache()``, extended in place (incremental decoding).
        eager: softmax written out instead of scaled_dot_product_attention; same numbers, slower.
        on_attention(layer, positions, probs): receives attention probabilities (B, H, t, S) of the query rows
            ``attention_rows`` (absolute positions; None = all) as each layer computes them. On the fast path
            only those rows are computed eagerly, so asking for the last row at long context is cheap."""
        h = self.hidden_states(input_ids, cache, eager, on_attention, attention_rows)
        return self.lm_head(h[:, -1:] if last_only else h)

    def nll(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, chunk_size: int = 1024,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token negative log-likelihood: (sum over predicted tokens, number of them). Labels default to
        the inputs; -100 is ignored. Logits are made ``chunk_size`` positions at a time and, when training,
        recomputed in backward, so the (T, V) logits never exist at once."""
        masked = labels is not None  # only given labels can hold -100: the inputs' own never do
        labels = input_ids if labels is None else labels
        h = self.hidden_states(input_ids)[:, :-1]                                    # (B, T-1, C)
        targets = labels[:, 1:]                                                       # (B, T-1)
        if torch.is_grad_enabled():  # the gradients are made with the loss, in the same pass over the chunks
            total = LinearCrossEntropy.apply(h, self.lm_head.weight, targets, chunk_size, masked)
        else:                        # evaluation: the loss alone
            total = _chunked_nll(h, self.lm_head.weight, targets, chunk_size, masked, False, False)[0]
        return total, (targets != -100).sum()


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits h W^T, the output layer and the loss in one: ``forward`` makes the
    logits ``chunk_size`` positions at a time and, with each chunk's loss, its gradients w.r.t. h and W, then
    drops the logits; ``backward`` only scales those by the upstream gradient. So the (T, V) logits never
    exist at once and are made once, not again in backward (what GPU fused linear-cross-entropy kernels do).

    h (B, T, C), weight (V, C): the tensors the model holds at this call (under FSDP2 the unsharded weight; a
    tied weight is the embedding's Parameter, so autograd adds this gradient to the embedding's own).
    targets (B, T) with -100 = not predicted; ``masked`` says they may hold -100 (then all -100 chunks are
    skipped)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, masked):
        total, dh, dw = _chunked_nll(h, weight, targets, chunk_size, masked, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(dh, dw)  # saved, not kept on ctx: freed as soon as backward has run
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * grad_total, None if dw is None else dw * grad_total,
                None, None, None)


def _chunked_nll(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, masked: bool,
                 want_dh: bool, want_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(NLL sum in float32, its gradient w.r.t. h or None, w.r.t. weight or None), a chunk at a time.
    The matmuls run in autocast's dtype when it is on (as ``h @ weight.T`` would), the softmax in float32;
    the weight gradient is summed over chunks in float32; both gradients come back in their input's dtype."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    w = weight.to(dtype)  # cast once, not per chunk and per matmul
    B, T, C = h.shape
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.zeros_like(h) if want_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
    for start in range(0, T, chunk_size):
        rows = slice(start, start + chunk_size)
        tc = targets[:, rows].flatten()                                              # (B*t,)
        if masked and bool((tc == -100).all()):  # a host sync on GPUs: not in training, which has no labels
            continue  # context only (a sliding window's already-scored tokens): no logits, no gradient
        hc = h[:, rows].to(dtype).flatten(0, 1)                                      # (B*t, C)
        nll, dlogits = _chunk_nll(hc, tc, w, want_dh or want_dw)
        total += nll
        if dlogits is not None:
            dlogits = dlogits.to(dtype)
            if want_dh:
                dh[:, rows] = (dlogits @ w).view(B, -1, C)                           # (B, t, C)
            if want_dw:
                dw += dlogits.T @ hc                                                 # (V, C)
    return total, dh, None if dw is None else dw.to(weight.dtype)


def _chunk_nll(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, with_grad: bool,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_i [logsumexp(z_i) - z_i,y_i] over the rows i whose label y_i is not -100, z = h W^T in float32
    ((N, C) x (V, C) -> (N, V)), and with ``with_grad`` its gradient w.r.t. z:
    d/dz_ij = softmax(z_i)_j - [j = y_i], zero on ignored rows. The gradient overwrites the logits."""
    logits = (h @ weight.T).float()                                                   # (N, V)
    counted = targets != -100
    y = targets.clamp(min=0)  # any valid index on ignored rows, whose terms are dropped
    lse = logits.logsumexp(-1)                                                        # (N,)
    nll = torch.where(counted, lse - logits.gather(-1, y[:, None])[:, 0], 0).sum()
    if not with_grad:
        return nll, None
    dlogits = logits.sub_(lse[:, None]).exp_()                                        # softmax(z), in place
    dlogits[torch.arange(len(y), device=y.device), y] -= 1
    return nll, dlogits.masked_fill_(~counted[:, None], 0)


@torch.no_grad()
def generate(model: Llama, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | list | None = None,
             on_attention: AttentionCallback | None = None) -> list[int]:
    """Greedy decoding with the KV cache. The prompt is prefilled on the fast path; each generated token's
    own attention row is observed (eagerly, O(L) memory) when ``on_attention`` is given: the callback is
    called for the query that produces generated token j with positions == [prompt_len - 1 + j]."""
    stop = set(eos_id if isinstance(eos_id, list) else [] if eos_id is None else [eos_id])
    cache, out = model.new_cache(), []
    prompt_last = torch.tensor([input_ids.shape[1] - 1])
    logits = model(input_ids, cache=cache, on_attention=on_attention, attention_rows=prompt_last, last_only=True)
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in stop or len(out) == max_new_tokens:
            break
        logits = model(torch.tensor([[token]], device=input_ids.device), cache=cache, eager=True,
                       on_attention=on_attention)
    return out


# --------------------------------------------------------------------------------------------------------------
# Loading and saving (Hugging Face layout, strict)
# --------------------------------------------------------------------------------------------------------------

def hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def read_config(path: Path) -> LlamaConfig:
    if not path.exists():
        raise RopeliteError(f"no such model: {path}")
    file = path / "config.json"
    if not file.is_file():
        raise RopeliteError(f"no config.json in {path}: not a Hugging Face model directory")
    try:
        return LlamaConfig.from_hf(json.loads(file.read_text()))
    except json.JSONDecodeError as e:
        raise RopeliteError(f"{file} is not valid JSON: {e}") from None


def _safetensors_files(path: Path) -> list[Path]:
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    raise RopeliteError(f"no model.safetensors or model.safetensors.index.json in {path}")


def read_weights(path: Path, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, by Hugging Face name, in dtype on device."""
    from safetensors import SafetensorError, safe_open
    tensors = {}
    for file in _safetensors_files(path):
        if not file.is_file():
            raise RopeliteError(f"shard {file.name} named by the index is missing in {path}")
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key).to(dtype=dtype, device=device)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise RopeliteError(f"cannot read {file}: {str(e).splitlines()[0]} (truncated or corrupt?)") from None
    return tensors


def load_model(path, rope: str | None = None, factor: float | None = None, dtype: torch.dtype = torch.float32,
               device="cpu", **rope_kwargs) -> Llama:
    """Load a Hugging Face LLaMa directory. The RoPE variant is the config's unless ``rope``/``factor``/
    rope_kwargs (e.g. ``base=1e6`` for ntk, ``beta_fast``) override it; the pretrained base and length stay."""
    path = Path(path)
    config = read_config(path).with_rope(rope, factor, **rope_kwargs)
    tensors = read_weights(path, dtype, device)
    with torch.device("meta"):
        model = Llama(config)
    expected = {hf_name(k): v.shape for k, v in model.state_dict().items()
                if not (config.tie_word_embeddings and k == "lm_head.weight")}
    for key in sorted(set(tensors) - set(expected)):
        if key.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and key == "lm_head.weight"):
            continue  # derived values some checkpoints carry; ours are computed from the config
        raise RopeliteError(f"unexpected tensor '{key}' in {path}")
    for key, shape in expected.items():
        if key not in tensors:
            raise RopeliteError(f"missing tensor '{key}' in {path}")
        if tensors[key].shape != shape:
            raise RopeliteError(f"tensor '{key}' has shape {tuple(tensors[key].shape)}, expected {tuple(shape)}")
    return model_from_state(config, {k.removeprefix("model."): tensors[k] for k in expected}).eval()


def model_from_state(config: LlamaConfig, state: dict[str, torch.Tensor]) -> Llama:
    """A Llama around existing tensors, assigned rather than copied, keyed by our module names (a tied
    ``lm_head.weight`` may be absent): for loading, and for saving a gathered training state dict."""
    with torch.device("meta"):
        model = Llama(config)
    if config.tie_word_embeddings:  # the meta model lists the shared weight under both names
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def save_model(model: Llama, out_dir, max_shard_bytes: int | None = None, extra_config: dict | None = None) -> Path:
    """Write safetensors (sharded with an index past ``max_shard_bytes``) and a transformers-loadable
    config.json. Each file is written atomically; config.json last, so a directory with a config is complete."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tied = model.config.tie_word_embeddings
    state = {hf_name(k): v.detach().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    shards: list[dict] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        with atomic_path(out / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if len(shards) > 1:
        write_json(index, {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                           "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}})
    else:
        index.unlink(missing_ok=True)  # a stale index would shadow nothing, but would mislead a reader
    dtype = next(iter(state.values())).dtype
    config = {**model.config.to_hf(), "torch_dtype": str(dtype).removeprefix("torch."), **(extra_config or {})}
    write_json(out / "config.json", config)
    return out
