"""ropelite.model on tiny random LLaMas: the fast (SDPA) and eager paths, the KV cache for every RoPE variant, the
chunked loss, gradient checkpointing, and the blocks against their formulas written out in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ropelite.hf import load_model, save_model
from ropelite.model import ATTENTION_KERNELS, CPU_FP32_TRAINING_KEYS, KVCache, generate
from ropelite.rope import RopeConfig

L = 32  # pretrained length of the RoPE variants below; tests run past it


def ids_for(T, B=1, seed=0):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def rope_config(kind, factor=2.0):
    extra = {}
    if kind == "longrope":  # d/2 = 8 per-pair factors; the long set differs from the short one
        extra = {"short_factor": (1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 2.0, 2.0),
                 "long_factor": (1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 4.0, 4.0)}
    return RopeConfig(type=kind, theta=1e4, factor=factor, original_max_position_embeddings=L, **extra)


def assert_close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------------------------
# Blocks against their formulas
# --------------------------------------------------------------------------------------------------------------

def test_rmsnorm_by_hand(tiny_llama):
    norm = tiny_llama().norm
    x = torch.randn(3, 5, 64) * 3
    w, eps = norm.weight.double(), norm.eps
    expected = x.double() / torch.sqrt((x.double() ** 2).mean(-1, keepdim=True) + eps) * w
    assert_close(norm(x).double(), expected)


def test_swiglu_by_hand(tiny_llama):
    mlp = tiny_llama().layers[0].mlp
    x = torch.randn(2, 4, 64, dtype=torch.float64)
    gate, up, down = (p.weight.double() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    a = x @ gate.T
    expected = (a / (1 + torch.exp(-a)) * (x @ up.T)) @ down.T      # silu(z) = z * sigmoid(z)
    assert_close(mlp(x.float()).double(), expected, tol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Fast path == eager path; the attention probabilities
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_eager_equals_sdpa(tiny_llama, kv_heads):
    model = tiny_llama(rope=rope_config("yarn", 4.0), num_key_value_heads=kv_heads)
    ids = ids_for(48, B=2)
    with torch.no_grad():
        assert_close(model(ids, eager=True), model(ids))


def test_eager_equals_sdpa_with_cache(tiny_llama):
    model = tiny_llama(rope=rope_config("pi"))
    ids = ids_for(40)
    outs = {}
    with torch.no_grad():
        for eager in (False, True):
            cache = model.new_cache()
            outs[eager] = torch.cat([model(ids[:, :25], cache=cache, eager=eager),
                                     model(ids[:, 25:31], cache=cache, eager=eager),
                                     *(model(ids[:, t:t + 1], cache=cache, eager=eager) for t in range(31, 40))], 1)
    assert_close(outs[True], outs[False])


def test_observed_rows_fast_path_equals_eager(tiny_llama):
    model = tiny_llama(rope=rope_config("yarn"))
    ids, rows = ids_for(40, B=2), torch.tensor([0, 17, 39])
    seen = {False: [], True: []}
    with torch.no_grad():
        fast = model(ids, on_attention=lambda *a: seen[False].append(a), attention_rows=rows)
        eager = model(ids, eager=True, on_attention=lambda *a: seen[True].append(a), attention_rows=rows)
        plain = model(ids)
    assert_close(fast, plain)          # observing does not change the result
    assert_close(eager, plain)
    for (lf, pf, probs_f), (le, pe, probs_e) in zip(seen[False], seen[True], strict=True):
        assert lf == le and pf.tolist() == pe.tolist() == rows.tolist()
        assert probs_f.shape == (2, 4, 3, 40) and probs_f.dtype == torch.float32
        assert_close(probs_f, probs_e)
    assert [s[0] for s in seen[False]] == [0, 1]


def test_probs_are_causal_distributions_equal_to_softmax_by_hand(tiny_llama):
    """Layer 0's probabilities equal softmax(q k^T / sqrt d) recomputed from the weights in float64, with the
    rotation written as complex multiplication (halves layout) and theta_i = b^(-2i/d) / s (PI)."""
    s, T = 2.0, 40
    model = tiny_llama(rope=rope_config("pi", s))
    ids = ids_for(T, B=2)
    got = {}
    with torch.no_grad():
        model(ids, eager=True, on_attention=lambda layer, pos, p: got.setdefault(("eager", layer), p))
        model(ids, on_attention=lambda layer, pos, p: got.setdefault(("fast", layer), p))
    for (_, layer), p in got.items():
        assert p.shape == (2, 4, T, T)
        assert_close(p.sum(-1), torch.ones(2, 4, T))
        assert (p.triu(1) == 0).all()                            # causal: nothing above the diagonal

    attn = model.layers[0].self_attn
    x = model.embed_tokens.weight.double()[ids]                  # (B, T, C)
    w = model.layers[0].input_layernorm.weight.double()
    h = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * w
    d = 16
    theta = torch.tensor([1e4 ** (-2 * i / d) / s for i in range(d // 2)], dtype=torch.float64)
    turn = torch.exp(1j * torch.arange(T, dtype=torch.float64)[:, None] * theta)    # (T, d/2)

    def rotated(weight, heads):
        z = (h @ weight.double().T).view(2, T, heads, d).transpose(1, 2)            # (B, heads, T, d)
        c = (z[..., : d // 2] + 1j * z[..., d // 2:]) * turn
        return torch.cat([c.real, c.imag], -1)

    q, k = rotated(attn.q_proj.weight, 4), rotated(attn.k_proj.weight, 2).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
    expected = scores.softmax(-1)
    assert_close(got[("eager", 0)].double(), expected, tol=1e-5)
    assert_close(got[("fast", 0)].double(), expected, tol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# KV cache == full forward
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["rope", "pi", "yarn", "ntk", "llama3"])
def test_cached_decoding_equals_full_forward(tiny_llama, kind):
    model = tiny_llama(rope=rope_config(kind))
    T = 48                                                       # past L = 32
    ids = ids_for(T)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache, eager=True) for t in range(T)], 1)
        cache = model.new_cache()
        chunks = torch.cat([model(ids[:, a:b], cache=cache) for a, b in ((0, 7), (7, 20), (20, 21), (21, T))], 1)
    assert len(cache) == T
    assert_close(steps, full)
    assert_close(chunks, full)


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_length_dependent_cache_rerotates_keys(tiny_llama, kind):
    """Past L the frequencies change with the length: the last-token logits of a cached decode must equal a full
    forward of the same length. Keys cached already rotated (transformers #25104, emulated by a cache with
    raw_keys=False) keep the stale frequencies, and this test must see the difference. One layer: from layer 1 on,
    past tokens' keys/values come from attention at the length they were seen, which no cache can redo (see
    KVCache); the two-layer case is checked below."""
    model = tiny_llama(rope=rope_config(kind, 4.0), num_hidden_layers=1)
    ids = ids_for(44)
    with torch.no_grad():
        good, stale = model.new_cache(), KVCache(1, raw_keys=False)
        assert good.raw_keys
        for cache in (good, stale):
            model(ids[:, :28], cache=cache)
        worst_stale = 0.0
        for n in range(29, 45):
            full = model(ids[:, :n])[:, -1]
            eager = n % 2 == 0
            assert_close(model(ids[:, n - 1:n], cache=good, eager=eager)[:, -1], full)
            worst_stale = max(worst_stale, (model(ids[:, n - 1:n], cache=stale, eager=eager)[:, -1] - full).abs().max())
        assert worst_stale > 1e-2                            # the stale-base bug is visible at this size
        cache = model.new_cache()                              # a chunk that crosses L
        model(ids[:, :20], cache=cache)
        assert_close(model(ids[:, 20:44], cache=cache), model(ids)[:, 20:])


def test_longrope_cache_exact_once_past_L(tiny_llama):
    """With a prefill already past L, longrope's frequencies stay the long set: decoding is exact at any depth."""
    model = tiny_llama(rope=rope_config("longrope", 4.0))
    ids = ids_for(44)
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :36], cache=cache)
        steps = torch.cat([model(ids[:, n:n + 1], cache=cache, eager=True) for n in range(36, 44)], 1)
        assert_close(steps, model(ids)[:, 36:])


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_first_token_after_a_prefill_is_exact_only_when_the_frequencies_have_not_moved(tiny_llama, kind):
    """KVCache's claim, two layers: the step at total length n equals a full forward exactly when every cached
    token was processed with the frequencies of length n: dynamic while n <= L; longrope while n <= L and once the
    prefill is past L. A prefill at or past L is followed by an approximate first token for dynamic."""
    model = tiny_llama(rope=rope_config(kind, 2.0))
    ids = ids_for(44)
    exact = {20: True, L: False, 40: kind == "longrope"}      # prefill length -> is the next token exact?
    with torch.no_grad():
        for prefill, expected in exact.items():
            cache = model.new_cache()
            model(ids[:, :prefill], cache=cache)
            step = model(ids[:, prefill:prefill + 1], cache=cache)[:, -1]
            error = (step - model(ids[:, :prefill + 1])[:, -1]).abs().max()
            assert (error < 1e-5) == expected, (prefill, float(error))
            assert expected or error > 1e-3                    # inexact by a visible margin, not by rounding


# --------------------------------------------------------------------------------------------------------------
# Loss, gradients
# --------------------------------------------------------------------------------------------------------------

def full_nll(model, ids, labels):
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_nll_and_its_gradient(tiny_llama, tied):
    model = tiny_llama(tie_word_embeddings=tied)
    ids = ids_for(30, B=2)
    labels = ids.clone()
    labels[0, 5:9] = -100
    total, count = model.nll(ids, labels, chunk_size=7)
    assert count == 2 * 29 - 4
    expected = full_nll(model, ids, labels)
    assert_close(total, expected)
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(total, params)
    want = torch.autograd.grad(expected, params)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, tol=1e-4)
    with torch.no_grad():
        assert_close(model.nll(ids)[0], full_nll(model, ids, ids))   # labels default to the inputs


class CountOps(TorchDispatchMode):
    """Counts the calls of the ops in ``ops`` under it (forward, recompute and backward alike)."""

    def __init__(self, ops):
        super().__init__()
        self.ops, self.calls = set(ops), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in self.ops
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ckpt, keep_attention, block_runs, kernel_runs", [
    (False, False, 1, 1),   # no checkpointing: each block and its attention run once
    (True, False, 2, 2),    # checkpointing: the whole block again in backward
    (True, True, 2, 1),     # keep_attention: the block again, its attention kernel not
])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama, ckpt, keep_attention, block_runs, kernel_runs):
    model = tiny_llama(rope=rope_config("yarn")).train()
    ids = ids_for(40, B=2)
    model.nll(ids)[0].backward()
    reference = [p.grad.clone() for p in model.parameters()]       # no checkpointing
    calls = []
    model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))  # recompute stops early: no post hook
    model.gradient_checkpointing, model.keep_attention = ckpt, keep_attention
    model.zero_grad()
    with CountOps(ATTENTION_KERNELS) as kernels:
        model.nll(ids)[0].backward()
    assert len(calls) == block_runs
    assert kernels.calls == kernel_runs * len(model.layers)         # the fused kernel is what runs on CPU
    for a, b in zip(reference, [p.grad for p in model.parameters()], strict=True):
        assert_close(a, b, tol=1e-5)


class KernelDtypes(TorchDispatchMode):
    """The dtypes of q in each call of the CPU flash attention kernel (forward) under it."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("T, train, kernel_dtype", [
    (40, True, torch.float32),        # training over <= CPU_FP32_TRAINING_KEYS keys: fp32 (the faster backward)
    (CPU_FP32_TRAINING_KEYS + 1, True, torch.bfloat16),
    (40, False, torch.bfloat16),      # no backward to pay for: bf16
])
def test_cpu_bf16_training_takes_short_attention_in_fp32(tiny_llama, T, train, kernel_dtype):
    """Under bf16 autocast the attention of a short training sequence runs in fp32 (autocast, which would cast
    it back, is off for it) and its backward runs; longer sequences and evaluation stay in bf16."""
    model = tiny_llama(rope=rope_config("yarn")).train()
    ids = ids_for(T, B=2)
    with KernelDtypes() as seen, torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(train):
        loss = model.nll(ids)[0]
    assert seen.dtypes == [kernel_dtype] * len(model.layers)
    if train:
        loss.backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_keep_attention_saves_the_cpu_bf16_kernel_under_autocast(tiny_llama):
    """train.py --dtype bf16 --keep-attention on a CPU: under bf16 autocast over fp32 weights, SDPA takes bf16 q/k/v
    and dispatches to the CPU flash kernel, which ATTENTION_KERNELS must hold for keep_attention to save it: then
    it runs once per block (forward only, not again in the recompute), and the gradients are those of the run
    without checkpointing, as in fp32 (bit for bit: the recompute redoes the same bf16 operations)."""
    model = tiny_llama(rope=rope_config("yarn")).train()
    ids = ids_for(40, B=2)
    grads = {}
    for ckpt, keep in ((False, False), (True, True)):
        model.gradient_checkpointing, model.keep_attention = ckpt, keep
        model.zero_grad()
        with CountOps(ATTENTION_KERNELS) as kernels, torch.autocast("cpu", dtype=torch.bfloat16,
                                                                      cache_enabled=False):
            dtypes = []
            hook = model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: dtypes.append(a[0].dtype))
            loss = model.nll(ids)[0]
            hook.remove()
        loss.backward()
        assert dtypes == [torch.bfloat16] and kernels.calls == len(model.layers)
        grads[keep] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[False], grads[True], strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------
# Other entry points
# --------------------------------------------------------------------------------------------------------------

def test_last_only_and_hidden_states(tiny_llama):
    model = tiny_llama()
    ids = ids_for(20, B=2)
    with torch.no_grad():
        full = model(ids)
        assert_close(model(ids, last_only=True), full[:, -1:])
        assert_close(model.lm_head(model.hidden_states(ids)), full)


def test_generate_is_greedy_and_reports_its_rows(tiny_llama):
    model = tiny_llama(rope=rope_config("dynamic"))
    prompt = ids_for(30)
    rows = []
    out = generate(model, prompt, 8, on_attention=lambda layer, pos, p: rows.append((layer, pos.tolist(), p.shape)))
    seq = prompt
    with torch.no_grad():
        for token in out:                                        # the same greedy choice from full forwards
            assert token == int(model(seq)[0, -1].argmax())
            seq = torch.cat([seq, torch.tensor([[token]])], 1)
    layer0 = [(pos, shape) for layer, pos, shape in rows if layer == 0]
    assert [pos for pos, _ in layer0] == [[29 + j] for j in range(8)]
    assert [shape[-1] for _, shape in layer0] == list(range(30, 38))


@pytest.mark.parametrize("kind", ["yarn", "dynamic"])
def test_rope_is_an_argument_not_a_mutation(tiny_llama, tmp_path, kind):
    """One loaded model serves several variants: with rope=..., every entry point equals a model loaded with
    that variant, and the model's own config is left as it was."""
    model = tiny_llama()
    config = model.config
    save_model(model, tmp_path)
    other = load_model(tmp_path, kind, 4.0)
    rope = other.config.rope
    assert rope != config.rope
    ids = ids_for(80)                                            # past the pretrained length 64
    with torch.no_grad():
        assert torch.equal(model(ids, rope=rope), other(ids))
        assert torch.equal(model.hidden_states(ids, rope=rope), other.hidden_states(ids))
        assert all(torch.equal(a, b) for a, b in zip(model.nll(ids, rope=rope), other.nll(ids)))
        cache, reference = model.new_cache(rope), other.new_cache()
        assert cache.raw_keys == reference.raw_keys
        for a, b in ((0, 60), (60, 70), (70, 71), (71, 80)):
            # one-row matmuls may round differently over the two models' weight storage (~5e-7 seen)
            assert_close(model(ids[:, a:b], cache=cache, rope=rope), other(ids[:, a:b], cache=reference))
        assert generate(model, ids[:, :70], 6, rope=rope) == generate(other, ids[:, :70], 6)
        assert not torch.equal(model(ids), other(ids))          # the default is still the model's own RoPE
    assert model.config is config and model.config.rope == RopeConfig(theta=1e4, original_max_position_embeddings=64)


def test_bf16_model_runs(tiny_llama):
    model = tiny_llama(rope=rope_config("yarn"))
    ids = ids_for(40)
    with torch.no_grad():
        ref = model(ids)
        model = model.to(torch.bfloat16)
        fast, eager = model(ids), model(ids, eager=True)
        cache = model.new_cache()
        steps = torch.cat([model(ids[:, :30], cache=cache), model(ids[:, 30:], cache=cache, eager=True)], 1)
    for out in (fast, eager, steps):
        assert out.dtype == torch.bfloat16 and out.isfinite().all()
        # bf16 keeps the model: logits track the fp32 ones closely
        assert F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0) > 0.99
