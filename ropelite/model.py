"""A LLaMa in one file, read top to bottom: config, blocks, attention (fast and eager), cache, model, generate.

It runs exactly the model of a Hugging Face LLaMa checkpoint (``ropelite.hf`` reads and writes that layout),
with the RoPE variant of ``ropelite.rope`` asked for, per call if wanted: ``model(ids, rope=...)``. Parameter
names are Hugging Face's without the leading ``model.``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts, noop_context_fn

from .errors import RopeliteError
from .loss import LinearCrossEntropy, chunked_nll
from .rope import RopeConfig, apply_rope, rope_cos_sin

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
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)

    def with_rope(self, rope: str | None = None, factor: float | None = None, **rope_kwargs) -> "LlamaConfig":
        """The same model with another RoPE variant. The pretrained base and length come from this config."""
        if rope is None and factor is None and not rope_kwargs:
            return self
        current = self.rope
        same = rope in (None, current.type)  # naming the checkpoint's own variant keeps its settings
        new = RopeConfig(type=rope or current.type, theta=current.theta,
                         factor=current.factor if factor is None else float(factor),
                         original_max_position_embeddings=current.original_max_position_embeddings,
                         **{**(current.settings() if same else {}), **rope_kwargs})
        return dataclasses.replace(self, rope=new)


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


# Which scaled_dot_product_attention kernels may run. On CUDA only the O(L)-memory ones are allowed, so that the
# math kernel's L x L score matrix per head (144 GiB per layer at 64K for SmolLM2 in fp32) is an error, not a
# silent allocation. Flash takes fp16/bf16 with a causal or no mask and grouped-query attention natively; the
# memory-efficient kernel also takes fp32 and a boolean mask, but not enable_gqa, so k/v are expanded to the query
# heads for it (O(L) memory: H/Hkv times the cache's k/v). CPU: PyTorch's own choice (its flash kernel takes
# fp32, and the masked decode step is one row).
O_L_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


@dataclass(frozen=True)
class KernelChoice:
    backends: tuple | None  # the SDPBackends allowed; None = PyTorch chooses
    expand_kv: bool         # repeat k/v to the query heads instead of enable_gqa
    name: str               # for the log line


def choose_kernel(device_type: str, dtype: torch.dtype, n_heads: int, n_kv: int, causal: bool) -> KernelChoice:
    """The attention kernel for q of ``dtype`` on ``device_type`` with ``n_heads`` query and ``n_kv`` key heads;
    ``causal``: the square causal mask (a prefill or training), else a boolean (T, S) mask (a cached step)."""
    if device_type != "cuda":
        return KernelChoice(None, False, "PyTorch's choice")
    gqa = n_heads != n_kv
    if dtype in (torch.float16, torch.bfloat16) and causal:
        return KernelChoice(O_L_BACKENDS, False, "flash/cuDNN/memory-efficient" + (", native GQA" if gqa else ""))
    return KernelChoice((SDPBackend.EFFICIENT_ATTENTION,), gqa,
                        "memory-efficient" + (f", k/v expanded {n_kv} -> {n_heads} heads" if gqa else ""))


def attention_kernel_note(config: "LlamaConfig", device: torch.device | str, dtype: torch.dtype) -> str:
    """One line for a run's log: the attention kernel(s) of the prefill/training and of a cached decoding step."""
    device_type = torch.device(device).type
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    full, step = (choose_kernel(device_type, dtype, H, Hkv, causal) for causal in (True, False))
    dtype_name = str(dtype).removeprefix("torch.")
    return (f"attention ({dtype_name}, {device_type}): {full.name}" +
            ("" if step == full else f"; cached decoding steps: {step.name}"))


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
    def _sdpa(q, k, v, q_pos, kernel: "KernelChoice | None" = None):
        T, S = q.shape[2], k.shape[2]
        kernel = kernel or choose_kernel(q.device.type, q.dtype, q.shape[1], k.shape[1], causal=T == S)
        if kernel.expand_kv:  # query head h reads key head h // rep, as enable_gqa does, for kernels without it
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)       # (B, H, S, d)
        if T == S:
            args = dict(is_causal=True)
        else:
            args = dict(attn_mask=torch.arange(S, device=q.device)[None, :] <= q_pos[:, None])  # (T, S), True = attend
        if kernel.backends is None:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=not kernel.expand_kv, **args)
        try:
            with sdpa_kernel(list(kernel.backends)):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=not kernel.expand_kv, **args)
        except RuntimeError as e:
            if "No available kernel" not in str(e) and "No viable backend" not in str(e):
                raise
            raise RopeliteError(
                f"no O(L)-memory attention kernel ({kernel.name}) takes {q.dtype} q {tuple(q.shape)} on "
                f"{q.device}, and PyTorch's math kernel would build the {T} x {S} scores per head; run in bf16 "
                f"(--dtype bf16; flash takes head_dim <= 256) or report the shapes") from None

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


# The fused attention kernels scaled_dot_product_attention dispatches to (CPU flash; CUDA flash, memory-efficient,
# cuDNN): the ops whose results ``Llama.keep_attention`` saves under checkpointing. The math fallback is
# recomputed: it only runs for inputs no fused kernel takes.
ATTENTION_KERNELS = [torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                     torch.ops.aten._scaled_dot_product_flash_attention.default,
                     torch.ops.aten._scaled_dot_product_efficient_attention.default,
                     torch.ops.aten._scaled_dot_product_cudnn_attention.default]
KEEP_ATTENTION = functools.partial(create_selective_checkpoint_contexts, ATTENTION_KERNELS)  # save these, redo the rest


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
    tokens were produced by attention at the length those tokens were seen. So a cached step at total length n
    equals a full forward of n tokens only for one layer, or when the frequencies at n are those every cached
    token was processed with: for dynamic while n <= L (plain RoPE), for longrope while n <= L and again once
    the prefill itself is past L (the long set throughout). Otherwise, even for the first token after a prefill
    (e.g. dynamic with a prefill at or past L), it approximates it. Measure long-context quality with full
    forwards."""

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
        # Gradient checkpointing keeps each block's input and recomputes the block in backward; keep_attention
        # also keeps what its attention kernel returned (the output (B, H, T, d) and log-sum-exp (B, H, T)), so
        # the recompute skips the O(T^2) part: one more (T, H*d) tensor per block, and at long T most of
        # the recompute's time. Default off: it doubles the activations checkpointing keeps.
        self.gradient_checkpointing = False
        self.keep_attention = False

    def new_cache(self, rope: RopeConfig | None = None) -> KVCache:
        """An empty cache for decoding with ``rope`` (default: the model's own); pass the same rope to every
        call that extends it."""
        return KVCache(self.config.num_hidden_layers, raw_keys=(rope or self.config.rope).variant.length_dependent)

    def rope_tables(self, past: int, total: int, device, rope: RopeConfig | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (rows, d) for the new positions past..total-1, or for all 0..total-1 when the frequencies
        depend on the length (cached keys are re-rotated then). Frequencies use the full length ``total``."""
        rope = rope or self.config.rope
        inv_freq, attention_factor = rope.frequencies(self.config.head_dim, total)
        first = 0 if rope.variant.length_dependent else past
        return rope_cos_sin(inv_freq, torch.arange(first, total, device=device), attention_factor)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None, eager: bool = False,
                      on_attention: AttentionCallback | None = None, attention_rows: torch.Tensor | None = None,
                      rope: RopeConfig | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, C). See ``forward`` for the arguments."""
        past = len(cache) if cache is not None else 0
        cos, sin = self.rope_tables(past, past + input_ids.shape[1], input_ids.device, rope)
        x = self.embed_tokens(input_ids)
        observer = None if on_attention is None else Observer(on_attention, attention_rows)
        for block in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False,  # recompute activations in backward
                               context_fn=KEEP_ATTENTION if self.keep_attention else noop_context_fn)
            else:
                x = block(x, cos, sin, cache, eager, observer)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, eager: bool = False,
                on_attention: AttentionCallback | None = None, attention_rows: torch.Tensor | None = None,
                last_only: bool = False, rope: RopeConfig | None = None) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with ``last_only``.

        rope: the RoPE variant to run (default: ``config.rope``); the model itself is not changed by it.
        cache: a ``new_cache(rope)``, extended in place (incremental decoding).
        eager: softmax written out instead of scaled_dot_product_attention; same numbers, slower.
        on_attention(layer, positions, probs): receives attention probabilities (B, H, t, S) of the query rows
            ``attention_rows`` (absolute positions; None = all) as each layer computes them. On the fast path
            only those rows are computed eagerly, so asking for the last row at long context is cheap."""
        h = self.hidden_states(input_ids, cache, eager, on_attention, attention_rows, rope)
        return self.lm_head(h[:, -1:] if last_only else h)

    def nll(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, chunk_size: int = 1024,
            rope: RopeConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token negative log-likelihood with ``rope`` (default: the model's own): (sum over predicted
        tokens, number of them). Labels default to the inputs; -100 is ignored. Logits are made ``chunk_size``
        positions at a time, with their gradients in the same pass when training (``LinearCrossEntropy``), so the
        (T, V) logits never exist at once and each chunk's are made once."""
        masked = labels is not None  # only given labels can hold -100: the inputs' own never do
        labels = input_ids if labels is None else labels
        h = self.hidden_states(input_ids, rope=rope)[:, :-1]                                    # (B, T-1, C)
        targets = labels[:, 1:]                                                       # (B, T-1)
        if torch.is_grad_enabled():  # the gradients are made with the loss, in the same pass over the chunks
            total = LinearCrossEntropy.apply(h, self.lm_head.weight, targets, chunk_size, masked)
        else:                        # evaluation: the loss alone
            total = chunked_nll(h, self.lm_head.weight, targets, chunk_size, masked, False, False)[0]
        return total, (targets != -100).sum()


@torch.no_grad()
def generate(model: Llama, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | list | None = None,
             on_attention: AttentionCallback | None = None, rope: RopeConfig | None = None) -> list[int]:
    """Greedy decoding with the KV cache. The prompt is prefilled on the fast path; each generated token's
    own attention row is observed (eagerly, O(L) memory) when ``on_attention`` is given: the callback is
    called for the query that produces generated token j with positions == [prompt_len - 1 + j]."""
    stop = set(eos_id if isinstance(eos_id, list) else [] if eos_id is None else [eos_id])
    cache, out = model.new_cache(rope), []
    prompt_last = torch.tensor([input_ids.shape[1] - 1])
    logits = model(input_ids, cache=cache, on_attention=on_attention, attention_rows=prompt_last, last_only=True,
                   rope=rope)
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in stop or len(out) == max_new_tokens:
            break
        logits = model(torch.tensor([[token]], device=input_ids.device), cache=cache, eager=True,
                       on_attention=on_attention, rope=rope)
    return out
