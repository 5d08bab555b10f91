"""Training on GPUs, one piece per concern: FSDP2 sharding with mixed precision, gradient sync over micro-batches,
the optimizer (fused AdamW on CUDA, or the lean mode's 8-bit AdamW over bf16 weights) and torch.compile per block.

Mixed precision under FSDP2 is FSDP's own ``MixedPrecisionPolicy``, not autocast: the fp32 master shards are
all-gathered as bf16 (half the traffic and the unsharded memory of an fp32 all-gather), blocks compute in bf16,
and gradients are reduce-scattered in fp32 into fp32 shards, which AdamW updates.

The lean mode fits a LLaMa-2-7B at 32K on one 80 GB GPU (``benchmarks/memory_estimate.py``, column
total_1gpu_lean_GiB: 53.6 GiB): weights and gradients in bf16 and torchao's AdamW8bit, whose two moments are
8-bit codes with one fp32 scale per block of 256 values, so 2 + 2 + 2.03 bytes per parameter instead of 16. Its
updates are rounded to bf16 stochastically (``bf16_stochastic_round``): round-to-nearest would drop every update
smaller than half a bf16 ulp of the weight (|w| 2^-9, i.e. a relative change below 0.2%, and lr 2e-5 makes nearly
all of them that small), while stochastic rounding keeps them right on average.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from .errors import RopeliteError
from .model import Llama

LEAN_PACKAGE = "torchao"  # pip install 'ropelite[lean]'


# --------------------------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------------------------

def mixed_precision(dtype: torch.dtype):
    """FSDP2's policy for compute in ``dtype``: parameters cast to it for the all-gather and the forward,
    gradients reduced in fp32. Forward inputs are not cast, so the RoPE tables a block receives stay fp32."""
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard(model: Llama, mesh, dtype: torch.dtype = torch.float32) -> None:
    """FSDP2: one all-gather/reduce-scatter group per block, then the root (embeddings, final norm, lm_head),
    all with ``mixed_precision(dtype)``."""
    policy = mixed_precision(dtype)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "nll")  # the loss is model.nll, not forward: unshard the root for it


@contextlib.contextmanager
def sync_on_last_micro_batch(model: nn.Module, n_micro_batches: int, sync_every_micro_batch: bool = False):
    """Within it, the backward of only the last of ``n_micro_batches`` forwards reduce-scatters gradients
    (FSDP2; nothing to do without it): the others accumulate the unsharded gradients locally, in fp32 (FSDP's
    reduce dtype), so each GPU holds 4 bytes per parameter of the WHOLE model more from the first micro-batch's
    backward until the last one's, which frees them group by group as it reduce-scatters them: 25.1 GiB for the
    LLaMa-2-7B, whose 4K run on 8 GPUs (train.py's 8 micro-batches per GPU) then needs 39.0 GiB per GPU
    (benchmarks/memory_estimate.py, column total_8gpu_GiB). One reduce-scatter of all gradients per step.

    ``sync_every_micro_batch``: every backward reduce-scatters, into the sharded gradients (4 bytes per parameter
    divided by the GPUs), for runs that do not fit the unsharded ones: 17.1 GiB for that run (column
    total_8gpu_sync_every_GiB), at the price of one reduce-scatter of all gradients per micro-batch instead of per
    step: 176 instead of 22 GiB sent by each GPU per step, beside 172 GiB of all-gathers either way (columns
    rs_8gpu_GiB, rs_8gpu_sync_every_GiB, ag_8gpu_GiB).

    The i-th forward is seen by a pre-hook on the embedding, which runs once per forward (it is outside the
    checkpointed blocks, so backward's recomputation does not run it again), and sets the sync flag before that
    micro-batch's backward."""
    if not isinstance(model, FSDPModule):
        yield
        return
    flags = iter(sync_flags(n_micro_batches, sync_every_micro_batch))
    handle = model.embed_tokens.register_forward_pre_hook(
        lambda module, args: model.set_requires_gradient_sync(next(flags)))
    try:
        yield
    finally:
        handle.remove()
        model.set_requires_gradient_sync(True)  # evaluation and the next step start from FSDP's default


def sync_flags(n_micro_batches: int, sync_every_micro_batch: bool = False) -> list[bool]:
    """For each micro-batch of a step, whether its backward syncs gradients: only the last one's, or every one's."""
    return [sync_every_micro_batch or i == n_micro_batches - 1 for i in range(n_micro_batches)]


# --------------------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------------------

def lean_weights(model: Llama, world: int) -> Llama:
    """The lean mode's model: every weight in bf16 (the optimizer updates them in place). One process only:
    with several GPUs FSDP shards the fp32 states instead."""
    if world != 1:
        raise RopeliteError(f"--lean is the one-GPU mode; on {world} processes FSDP2 already divides the fp32 "
                            f"states by {world}: drop --lean")
    return model.to(torch.bfloat16)


def make_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                   device: torch.device, lean: bool = False) -> torch.optim.Optimizer:
    """AdamW on every weight: the fused CUDA kernel on GPUs (one launch for all parameters), PyTorch's default
    elsewhere; ``lean``: torchao's AdamW8bit with stochastic bf16 rounding, for bf16 weights."""
    if not lean:
        fused = True if device.type == "cuda" else None
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        raise RopeliteError(f"--lean needs {LEAN_PACKAGE} (8-bit AdamW): pip install 'ropelite[lean]'") from None
    for name, p in model.named_parameters():
        if p.dtype != torch.bfloat16:
            raise RopeliteError(f"--lean updates bf16 weights, but {name} is {p.dtype}: pass lean_weights(model)")
    return AdamW8bit(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, bf16_stochastic_round=True)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; in place where it is a tensor (torchao's optimizers keep it as one, so
    that a new value does not recompile their step)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


# --------------------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------------------

def compile_blocks(model: Llama) -> None:
    """torch.compile each block in place; the loss and the RoPE tables stay eager. The blocks share one code and
    one shape, so dynamo compiles them once and reuses the graph. train.py calls it after ``shard`` (FSDP2's
    hooks then wrap compiled blocks; tested on 2 gloo processes: the losses of 1 eager process)."""
    for block in model.layers:
        block.compile()
