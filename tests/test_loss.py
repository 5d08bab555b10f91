"""The chunked loss (ropelite.loss.LinearCrossEntropy, Llama.nll): loss and gradients equal the unchunked
``F.cross_entropy`` on full logits, in float32 and under bf16; the gradients are made in the forward pass (the
logits of each chunk are computed once per step, not again in backward), and not at all in evaluation."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ropelite.loss
from ropelite.loss import LinearCrossEntropy

T, C, V = 29, 16, 50
CHUNKS = [1, 7, 29, 1000]  # one row; 7 does not divide T = 29; exactly T; larger than T


def inputs(dtype=torch.float32, seed=0):
    """h (2, T, C), weight (V, C) with grad, targets (2, T) with a run of -100 across a chunk boundary."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(2, T, C, generator=g) * 2).to(dtype).requires_grad_()
    w = torch.randn(V, C, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (2, T), generator=g)
    targets[0, 5:16] = -100
    return h, w, targets


def reference(h, w, targets):
    """The unchunked loss: full (2, T, V) logits, softmax in float32."""
    logits = (h @ w.T).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def close(got, want, rel):
    """Equal to ``rel`` relative to the largest entry of ``want`` (a gradient's small entries have no
    relative precision of their own: they are differences of products as large as the largest)."""
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * float(want.detach().float().abs().max()))


def loss_and_grads(loss_fn, h, w, targets, scale):
    loss = loss_fn(h, w, targets)
    return (loss, *torch.autograd.grad(loss * scale, (h, w)))  # an upstream gradient other than 1


@pytest.mark.parametrize("chunk", CHUNKS)
def test_float32_equals_cross_entropy(chunk):
    h, w, targets = inputs()
    got = loss_and_grads(lambda *a: LinearCrossEntropy.apply(*a, chunk, True), h, w, targets, 0.37)
    want = loss_and_grads(reference, h, w, targets, 0.37)
    for g, r in zip(got, want, strict=True):
        close(g, r, 1e-6)


@pytest.mark.parametrize("chunk", [7, 1000])
@pytest.mark.parametrize("weights", ["bf16 autocast", "bf16"])
def test_bfloat16_equals_cross_entropy(chunk, weights):
    """Under autocast (fp32 tensors, bf16 matmuls) and with bf16 tensors: the same bf16 logits as the
    reference's, softmax in float32 (so the loss agrees far below bf16's resolution), gradients within bf16
    rounding, in the inputs' dtypes."""
    dtype = torch.float32 if weights == "bf16 autocast" else torch.bfloat16
    h, w, targets = inputs(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights == "bf16 autocast"):
        got = loss_and_grads(lambda *a: LinearCrossEntropy.apply(*a, chunk, True), h, w, targets, 0.37)
        want = loss_and_grads(reference, h, w, targets, 0.37)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    close(got[0], want[0], 1e-5)  # a bf16 softmax would be ~1e-3 off
    for g, r in zip(got[1:], want[1:], strict=True):
        close(g, r, 1e-2)


def test_all_ignored_is_zero_loss_and_zero_gradients():
    h, w, targets = inputs()
    loss = LinearCrossEntropy.apply(h, w, torch.full_like(targets, -100), 7, True)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss == 0 and not gh.any() and not gw.any()


def test_only_the_inputs_that_need_a_gradient_get_one():
    h, w, targets = inputs()
    w.requires_grad_(False)  # a frozen output layer
    loss = LinearCrossEntropy.apply(h, w, targets, 7, True)
    (gh,) = torch.autograd.grad(loss, (h,))
    close(gh, torch.autograd.grad(reference(h, w, targets), (h,))[0], 1e-6)


# --------------------------------------------------------------------------------------------------------------
# Through a whole model
# --------------------------------------------------------------------------------------------------------------

def llama_inputs():
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, 3:12] = -100
    return ids, labels


def full_logits_loss(model, ids, labels):
    logits = model(ids)[:, :-1].float()                                               # (B, T-1, V)
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_llama_gradients_equal_full_logits_cross_entropy(tiny_llama, tied, chunk):
    model = tiny_llama(tie_word_embeddings=tied).train()
    ids, labels = llama_inputs()
    params = list(model.parameters())
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied  # tied: one Parameter, both gradients
    total, count = model.nll(ids, labels, chunk_size=chunk)
    want = full_logits_loss(model, ids, labels)
    assert count == 2 * 29 - 9
    close(total, want, 1e-6)
    for g, r in zip(torch.autograd.grad(total / count, params), torch.autograd.grad(want / count, params),
                    strict=True):
        close(g, r, 1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_gradients_under_bf16_autocast(tiny_llama, tied):
    model = tiny_llama(tie_word_embeddings=tied).train()
    ids, labels = llama_inputs()
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, count = model.nll(ids, labels, chunk_size=7)
        want = full_logits_loss(model, ids, labels)
    close(total, want, 1e-5)
    for g, r in zip(torch.autograd.grad(total, params), torch.autograd.grad(want, params), strict=True):
        close(g, r, 2e-2)


def log_chunks(monkeypatch) -> list[bool]:
    """Replace ropelite.loss._chunk_nll for this test by a wrapper logging each call's ``with_grad``."""
    calls, real = [], ropelite.loss._chunk_nll

    def logged(h, targets, weight, with_grad):
        calls.append(with_grad)
        return real(h, targets, weight, with_grad)

    monkeypatch.setattr(ropelite.loss, "_chunk_nll", logged)
    return calls


def test_logits_are_made_once_per_training_step(tiny_llama, monkeypatch):
    """The point of the single pass: backward makes no logits (the old path recomputed every chunk)."""
    model = tiny_llama().train()
    ids, _ = llama_inputs()
    calls = log_chunks(monkeypatch)
    total, _ = model.nll(ids, chunk_size=7)
    total.backward()
    assert calls == [True] * 5                                # ceil(29 / 7) chunks, each once, with its gradient


def test_evaluation_makes_no_gradients_and_skips_context_only_chunks(tiny_llama, monkeypatch):
    model = tiny_llama()
    ids, labels = llama_inputs()
    labels[1, :12] = -100                                     # with labels[0, 3:12]: positions 2..10 all ignored
    calls = log_chunks(monkeypatch)
    with torch.no_grad():
        total, _ = model.nll(ids, labels, chunk_size=3)
        want = full_logits_loss(model, ids, labels)
    close(total, want, 1e-6)
    assert calls == [False] * (10 - 2)                        # chunks [3, 6) and [6, 9) of 10 hold no target


class NewTensors(TorchDispatchMode):
    """Logs the shape of every tensor an op returns in new memory (not one of its inputs' storages)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        self.shapes += [tuple(t.shape) for t in tree_flatten(out)[0]
                        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


def test_each_chunk_makes_one_logits_sized_tensor_and_the_weight_gradient_is_summed_in_place():
    """Memory, float32: a chunk's logits are made once and overwritten by the exponentials, then the softmax and
    its gradient (no second (t, V) tensor); the (V, C) weight gradient is one accumulator, added to in place."""
    h, w, targets = inputs()
    with NewTensors() as log:
        LinearCrossEntropy.apply(h, w, targets, 7, True)
    chunks = [(2 * 7, V)] * 4 + [(2 * 1, V)]                                  # ceil(29 / 7) chunks of 2 x 7 rows
    assert [s for s in log.shapes if len(s) == 2 and s[-1] == V] == chunks
    assert log.shapes.count((V, C)) == 1
