"""The output layer and the loss in one: summed next-token cross-entropy of h W^T, a chunk of positions at a time.

``Llama.nll`` calls it. ``LinearCrossEntropy`` is the autograd op for training: its forward makes each chunk's
logits once, with the loss its gradients w.r.t. h and W, and drops them, so the (T, V) logits never exist at
once and backward has nothing to recompute (what GPU fused linear-cross-entropy kernels do). ``chunked_nll`` is
that pass, with or without the gradients; ``_chunk_nll`` is one chunk's log-sum-exp, loss and softmax gradient.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


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
        total, dh, dw = chunked_nll(h, weight, targets, chunk_size, masked, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(dh, dw)  # saved, not kept on ctx: freed as soon as backward has run
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * grad_total, None if dw is None else dw * grad_total,
                None, None, None)


def chunked_nll(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, masked: bool,
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
            if want_dw and dtype == dw.dtype:
                dw.addmm_(dlogits.T, hc)  # summed in place: no (V, C) product per chunk
            elif want_dw:
                dw += dlogits.T @ hc      # autocast: the product in its dtype, the sum in float32  (V, C)
    return total, dh, None if dw is None else dw.to(weight.dtype)


def _chunk_nll(h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, with_grad: bool,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_i [logsumexp(z_i) - z_i,y_i] over the rows i whose label y_i is not -100, z = h W^T in float32
    ((N, C) x (V, C) -> (N, V)), and with ``with_grad`` its gradient w.r.t. z:
    d/dz_ij = softmax(z_i)_j - [j = y_i], zero on ignored rows.

    logsumexp(z) = m + log sum_j exp(z_j - m) with m = max_j z_j (no overflow); the exponentials overwrite the
    logits and, divided by their sum, are the softmax: one (N, V) tensor and one exp pass for loss and gradient."""
    logits = (h @ weight.T).float()                                                   # (N, V)
    counted = targets != -100
    y = targets.clamp(min=0)  # any valid index on ignored rows, whose terms are dropped
    picked = logits.gather(-1, y[:, None])[:, 0]                                      # z_{i, y_i}  (N,)
    top = logits.amax(-1, keepdim=True)                                               # (N, 1)
    exps = logits.sub_(top).exp_()                                                    # exp(z - m), in place
    sums = exps.sum(-1, keepdim=True)                                                 # (N, 1)
    nll = torch.where(counted, top[:, 0] + sums[:, 0].log() - picked, 0).sum()
    if not with_grad:
        return nll, None
    dlogits = exps.div_(sums)                                                         # softmax(z), in place
    dlogits[torch.arange(len(y), device=y.device), y] -= 1
    return nll, dlogits.masked_fill_(~counted[:, None], 0)
