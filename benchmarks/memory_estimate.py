"""Training memory of train.py per GPU, COMPUTED (not measured), for SmolLM2-135M and LLaMa-2-7B or any config.

    python benchmarks/memory_estimate.py                                   # the table of docs/results.md: 4K/8K/16K/32K
    python benchmarks/memory_estimate.py --model path/to/model --len 8192 65536 --gpus 1 8 --micro-batch 2

The recipe is train.py's: AdamW over fp32 master weights (weights, gradients and two moments: 16 bytes per
parameter, divided by the number of GPUs under FSDP2), bf16 compute, gradient checkpointing per block, an O(len)
attention kernel (ropelite.model.choose_kernel) and the chunked loss (model.nll: ropelite.loss's
LinearCrossEntropy, 1024 positions at a time). One GPU: bf16 autocast over the fp32 weights, so the residual
stream stays fp32 and every matmul reads bf16 copies of its operands. Several GPUs: FSDP2's MixedPrecisionPolicy
(ropelite.parallel), which all-gathers bf16 weights, so the residual stream is bf16 and there are no autocast
copies. Lean (train.py --lean, one GPU): bf16 weights and gradients and torchao's AdamW8bit, whose moments are
8-bit codes with one fp32 scale per 256 values: 2 + 2 + 2 (1 + 4/256) bytes per parameter.

The step's peak is the largest of four moments (``PHASES``), each a sum of what is alive then:
    the loss          the kept activations, the final norm's, and the loss's forward or backward (below)
    the first block   the backward of the top block: the kept activations, the lm_head's new gradient, one block
    the last block    the backward of the bottom block: the gradients of everything above it, one block input,
                      one block
    the optimizer     all gradients and the optimizer step's temporaries; no activations
Held throughout: the weights and moments, and with several micro-batches per step the gradients of the earlier
ones: the accumulated .grad on one GPU; under FSDP2 the UNSHARDED fp32 gradients of the whole model, 4 bytes per
parameter (ropelite.parallel.sync_on_last_micro_batch: no reduce-scatter before the last micro-batch's backward,
which frees them group by group as it reduce-scatters them). The sharded gradients exist only from then on, so
while the unsharded ones are held they are not. With ``sync_every_micro_batch`` every backward reduce-scatters:
only the sharded gradients are held (4 / GPUs bytes per parameter), at the price of one reduce-scatter of all
gradients per micro-batch instead of one per step (``communication``: the rs columns of the table).
FSDP2 also holds what is in flight (``fsdp_in_flight``): the root group (embeddings, final norm, lm_head), gathered
from the loss to the end of backward; in a block's backward that block and the prefetched next one, gathered, and
the new unsharded gradients of the block and the root; at the end of a block's backward, its reduce-scatter's
fp32 input and output shard.

What autograd keeps of one block, per token (C hidden, F SwiGLU inner, H / Hkv heads of d, r = bytes of the
residual stream (4, or 2 when the weights are bf16), a = bytes of a matmul output (2 in bf16, 4 in fp32)); the
block input itself is the caller's (checkpointing keeps it; without, the first norm keeps it when it is fp32):
    RMSNorm x2, inputs in fp32     8C, less the fp32 block input   (a bf16 input is copied to fp32)
    RMSNorm x2, outputs            4rC; with autocast 8C (fp32 normed) + 5 x 2C (a bf16 copy per projection)
    the rsqrt of each norm         8
    q, k after RoPE, v, output     a(2H + 2Hkv)d, + 4H (log-sum-exp); Hkv = H where k/v are expanded (fp32
                                   on CUDA: the memory-efficient kernel has no GQA)
    gate, up, silu(gate), product  4aF
With autocast each matmul also keeps its bf16 weight copy: 2 bytes per block parameter for each block held. The
backward of a block adds the gradient of its output (rC, and its bf16 copy with autocast) and two F-wide
gradients at once (2aF). With checkpointing the L block inputs (rC each) are kept and one block is recomputed
at a time; --keep-attention also keeps each block's attention output and log-sum-exp (aHd + 4H), which the
recompute then reuses. Without checkpointing all L blocks' sets stay.
The final norm keeps (4 + r)C. The loss's forward holds its input h and the gradient dh it computes (rC each),
the weight's gradient in fp32 (4 V C; and a bf16 copy of lm_head with autocast or bf16 weights) and one chunk's
logits: the matmul's output and its fp32 copy, overwritten in place by the softmax and its gradient ((4 + a)
bytes x chunk x V in bf16, 4 in fp32). Its backward scales dh and the weight gradient into new tensors (each
twice at once).
The optimizer step: fused AdamW on CUDA (no temporaries); PyTorch's single-tensor AdamW elsewhere (three fp32
temporaries the size of the largest parameter: a square root, its quotient, and the previous parameter's
denominator, freed only when the next one replaces it); lean: torchao's compiled step works one parameter at a
time, 8 bytes x the largest parameter (measured on CPU with torchao 0.18: the same for one parameter or three).
The CUDA context: ``CUDA_CONTEXT`` per GPU. Not counted: NCCL's buffers, the caching allocator's fragmentation,
and transients smaller than one weight matrix. tests/test_memory_estimate.py checks all this against the live
tensor peak of training steps measured on CPU: fp32 and bf16, with and without checkpointing, --keep-attention,
micro-batches, and FSDP2 ranks (2 and 8), each phase being the peak of some case.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ropelite.cli import ArgumentParser, check, run_script
from ropelite.errors import RopeliteError
from ropelite.hf import read_config
from ropelite.io import write_results
from ropelite.model import LlamaConfig, choose_kernel
from ropelite.presets import PRESETS, preset

GIB = 2**30
LOSS_CHUNK = 1024  # model.nll's chunk_size
BATCH_TOKENS = 262144  # train.py's --batch-tokens for a pretrained model's default budget (tests check they agree)
# The CUDA context, with the lazy module loading PyTorch turns on (CUDA >= 11.7), before the first kernel:
# 287 MB (pytorch/pytorch#86509), about 400 MB (pytorch/pytorch#109888), 426 MiB with torch 2.10 and CUDA 13
# (unslothai/unsloth-zoo#1053); the kernels a training step then loads (cuBLAS, attention) add to it. Half a GiB
# is that rounded up; none of it was measured in this project.
CUDA_CONTEXT = GIB // 2
PHASES = ("loss", "first block", "last block", "optimizer")
LEAN_BYTES_PER_PARAM = 2 + 2 + 2 * (1 + 4 / 256)  # bf16 weight + bf16 gradient + AdamW8bit's m, v with scales


def block_params(c: LlamaConfig) -> int:
    attention = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    return attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size


def root_params(c: LlamaConfig) -> int:
    """Embeddings, lm_head (once when tied) and the final norm: FSDP's root group."""
    return c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.hidden_size


def param_count(c: LlamaConfig) -> int:
    return c.num_hidden_layers * block_params(c) + root_params(c)


def default_micro_batches(length: int, micro_batch: int = 1, gpus: int = 1, batch_tokens: int = BATCH_TOKENS) -> int:
    """Micro-batches per rank per optimizer step in train.py: batch_tokens // len sequences over the ranks."""
    return max(1, batch_tokens // length // (micro_batch * gpus))


def block_saved(c: LlamaConfig, r: int, a: int, autocast: bool, expand_kv: bool) -> int:
    """Bytes per token that autograd keeps of one block's forward, its input excluded (the table above)."""
    C, F, H, d = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.head_dim
    kv = H if expand_kv else c.num_key_value_heads
    norm_inputs = 8 * C - (4 * C if r == 4 else 0)
    norm_outputs = 8 * C + 5 * 2 * C if autocast else 4 * r * C
    return norm_inputs + norm_outputs + 8 + a * (2 * H + 2 * kv) * d + 4 * H + 4 * a * F


def loss_peak(c: LlamaConfig, n: int, rows: int, r: int, a: int, weight_bytes: int, autocast: bool) -> int:
    """LinearCrossEntropy's bytes beyond the kept activations: the larger of its forward (h, dh, the fp32 weight
    gradient, a bf16 copy of the weight, one chunk's logits) and its backward (dh and the weight gradient, and
    their scaled copies)."""
    C, V = c.hidden_size, c.vocab_size
    chunk = rows * V * (4 + (a if a != 4 else 0))
    forward = 2 * n * r * C + 4 * V * C + (2 * V * C if autocast or weight_bytes == 2 else 0) + chunk
    backward = 2 * n * r * C + 2 * V * C * weight_bytes
    return max(forward, backward)


def fsdp_in_flight(c: LlamaConfig, weight_bytes: int, gpus: int, accumulating: bool) -> dict:
    """FSDP2's unsharded memory beside the sharded states, in bytes. ``loss``: the root group (embeddings, final
    norm, lm_head), gathered from the start of forward to the end of backward. ``block``, through a block's
    backward: the root, that block and the prefetched next one gathered, and the new unsharded gradients of the
    block and the root in the weights' dtype (accumulated in place into the unsharded fp32 ones when those exist
    in fp32 already). ``reduce_scatter``, at the end of a block's backward when it syncs: its fp32 gradients
    copied into the reduce-scatter input, and its output shard."""
    bp, root = block_params(c), root_params(c)
    new_grads = 0 if accumulating and weight_bytes == 4 else weight_bytes * (bp + root)
    return {"loss": weight_bytes * root, "block": weight_bytes * (2 * bp + root) + new_grads,
            "reduce_scatter": 4 * bp * (1 + 1 / gpus)}


def estimate(c: LlamaConfig, length: int, micro_batch: int = 1, dtype: str = "bf16", grad_ckpt: bool = True,
             gpus: int = 1, loss_chunk: int = LOSS_CHUNK, lean: bool = False, keep_attention: bool = False,
             micro_batches: int = 1, sync_every_micro_batch: bool = False, fsdp: bool | None = None,
             device: str = "cuda", fused: bool | None = None) -> dict:
    """Peak training memory in bytes of one process of ``gpus``, by part, and the phase it peaks in.

    micro_batches: forwards per optimizer step on this process (train.py: ``default_micro_batches``);
    fsdp: sharded with FSDP2 (default: when gpus > 1; 1 is FSDP2 on one process, what benchmarks/gpu.py runs);
    device: "cuda" (its attention kernel choice and the CUDA context) or "cpu" (PyTorch's kernel, no context),
    for the CPU checks; fused: AdamW's fused kernel (default: on CUDA, as ropelite.parallel.make_optimizer)."""
    C, F, H, L, V = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers, c.vocab_size
    fsdp = gpus > 1 if fsdp is None else fsdp
    if lean and (gpus != 1 or fsdp or dtype != "bf16"):
        raise RopeliteError("the lean mode is bf16 on one GPU, without FSDP")
    if gpus > 1 and not fsdp:
        raise RopeliteError("several GPUs train with FSDP2")
    bf16_weights = dtype == "bf16" and (lean or fsdp)   # no autocast: the weights themselves are bf16
    autocast = dtype == "bf16" and not bf16_weights
    r, a = (2 if bf16_weights else 4), (2 if dtype == "bf16" else 4)
    weight_bytes = 2 if bf16_weights else 4              # of the weights a forward reads
    n = micro_batch * length                             # tokens in one forward
    P, shards = param_count(c), (gpus if fsdp else 1)
    if lean:
        weights, grads, moments = 2 * P, 2 * P, (LEAN_BYTES_PER_PARAM - 4) * P
    else:
        weights, grads, moments = 4 * P / shards, 4 * P / shards, 8 * P / shards
    # Gradients held between micro-batches: FSDP2's unsharded fp32 ones (no reduce-scatter before the last), or
    # the accumulated .grad (one GPU, or FSDP2 reduce-scattering each micro-batch: sharded)
    unsharded_grads = 4 * P if fsdp and micro_batches > 1 and not sync_every_micro_batch else 0
    earlier_grads = grads if micro_batches > 1 and not unsharded_grads else 0
    # the bottom block's backward sees the gradients of everything above it
    below = block_params(c) + (0 if c.tie_word_embeddings else V * C)
    grads_above = 0 if unsharded_grads else grads * (1 - below / P)
    flight = fsdp_in_flight(c, weight_bytes, gpus, bool(unsharded_grads)) if fsdp else \
        {"loss": 0, "block": 0, "reduce_scatter": 0}

    compute_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    expand_kv = choose_kernel(device, compute_dtype, H, c.num_key_value_heads, causal=True).expand_kv
    saved = block_saved(c, r, a, autocast, expand_kv)
    kept_attention = a * H * c.head_dim + 4 * H if keep_attention and grad_ckpt else 0
    block_casts = 2 * block_params(c) if autocast else 0  # bf16 weight copies of one block
    backward = 2 * a * F + r * C + (2 * C if autocast else 0)  # per token: two F-wide gradients, d(output)
    if grad_ckpt:
        kept = n * L * (r * C + kept_attention)
        block = n * (saved - kept_attention + backward) + block_casts
    else:
        kept = n * L * (saved + (r * C if r == 4 else 0)) + L * block_casts
        block = n * backward
    block = max(block, flight["reduce_scatter"]) + flight["block"]  # or, at its end, its reduce-scatter's buffers
    loss = n * (4 + r) * C + loss_peak(c, n, micro_batch * min(loss_chunk, length), r, a, weight_bytes, autocast)
    lm_head_grad = 0 if fsdp else V * C * weight_bytes  # under FSDP2 an unsharded root gradient, in flight
    largest = max(V * C, C * F) / shards
    fused = device == "cuda" if fused is None else fused
    optimizer_step = 8 * largest if lean else (0 if fused else 12 * largest)
    held = weights + moments + unsharded_grads
    phases = {"loss": held + earlier_grads + kept + loss + flight["loss"],
              "first block": held + (earlier_grads or lm_head_grad) + kept + block,
              "last block": held + (earlier_grads or grads_above) + n * r * C + block,
              "optimizer": weights + moments + grads + optimizer_step}
    peak = max(PHASES, key=phases.get)
    context = CUDA_CONTEXT if device == "cuda" else 0
    return {"params": P, "weights": weights, "grads": grads, "moments": moments, "unsharded_grads": unsharded_grads,
            "fsdp_in_flight": flight["block"], "kept_activations": kept, "phases": phases, "peak_phase": peak,
            "cuda_context": context, "total": phases[peak] + context,
            **communication(c, gpus if fsdp else 1, micro_batches, sync_every_micro_batch, weight_bytes)}


def communication(c: LlamaConfig, gpus: int, micro_batches: int, sync_every_micro_batch: bool,
                  weight_bytes: int) -> dict:
    """Bytes each GPU sends per optimizer step under FSDP2, in ring collectives ((gpus - 1) / gpus of each
    buffer): all-gathers of every block twice per micro-batch (forward, and again for backward, since blocks are
    resharded after forward) and the root once; reduce-scatters of all fp32 gradients once per step, or once
    per micro-batch with ``sync_every_micro_batch``."""
    share = (gpus - 1) / gpus
    gathered = micro_batches * (2 * c.num_hidden_layers * block_params(c) + root_params(c)) * weight_bytes
    syncs = micro_batches if sync_every_micro_batch else 1
    return {"all_gather_bytes": share * gathered, "reduce_scatter_bytes": share * syncs * 4 * param_count(c)}


def eval_estimate(c: LlamaConfig, length: int, loss_chunk: int = LOSS_CHUNK) -> dict:
    """Peak memory in bytes of the chunked loss ``model.nll`` without gradients, bf16 weights (evaluation on
    CUDA). Live at once: the weights, the residual stream and one block's transients (RMSNorm's fp32 copy, q/k/v
    and the attention output with RoPE's fp32 temporaries, SwiGLU's gate/up/product), then the final hidden
    states and one chunk's logits (bf16, their fp32 copy and the log-softmax)."""
    C, F, H, Hkv, d, V = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                          c.head_dim, c.vocab_size)
    weights = 2 * param_count(c)
    block = length * (2 * C + 4 * C + 2 * (2 * H + 2 * Hkv) * d + 4 * 2 * H * d + 3 * 2 * F)
    loss = length * 2 * C + min(loss_chunk, length) * V * (2 + 4 + 4)
    return {"weights": weights, "activations": max(block, loss), "total": weights + 2 * length * C + max(block, loss)}


def table_rows(models: dict[str, LlamaConfig], lengths, gpus_list, micro_batch: int, dtype: str,
               batch_tokens: int = BATCH_TOKENS) -> list[dict]:
    """One row per (model, len): GiB per GPU at train.py's defaults for each world size in ``gpus_list``."""
    rows = []
    for name, config in models.items():
        for length in lengths:
            row = {"model": name, "params_M": round(param_count(config) / 1e6, 1), "len": length,
                   "micro_batch": micro_batch, "dtype": dtype}
            for gpus in gpus_list:
                micro = default_micro_batches(length, micro_batch, gpus, batch_tokens)
                common = dict(micro_batch=micro_batch, dtype=dtype, gpus=gpus, micro_batches=micro)
                est = estimate(config, length, **common)
                row[f"micro_batches_{gpus}gpu"] = micro
                row[f"total_{gpus}gpu_GiB"] = round(est["total"] / GIB, 1)
                if gpus == 1:
                    row["total_1gpu_keep_attention_GiB"] = round(
                        estimate(config, length, keep_attention=True, **common)["total"] / GIB, 1)
                    row["total_1gpu_no_ckpt_GiB"] = round(
                        estimate(config, length, grad_ckpt=False, **common)["total"] / GIB, 1)
                    if dtype == "bf16":
                        lean = estimate(config, length, lean=True, **common)
                        row["total_1gpu_lean_GiB"] = round(lean["total"] / GIB, 1)
                else:
                    every = estimate(config, length, sync_every_micro_batch=True, **common)
                    row[f"total_{gpus}gpu_sync_every_GiB"] = round(every["total"] / GIB, 1)
                    row[f"rs_{gpus}gpu_GiB"] = round(est["reduce_scatter_bytes"] / GIB, 1)
                    row[f"rs_{gpus}gpu_sync_every_GiB"] = round(every["reduce_scatter_bytes"] / GIB, 1)
                    row[f"ag_{gpus}gpu_GiB"] = round(est["all_gather_bytes"] / GIB, 1)
                    row[f"peak_{gpus}gpu"] = est["peak_phase"]
            row["note"] = "computed, not measured"
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = [k for k in rows[0] if k not in ("note", "dtype", "micro_batch")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[k]) for k in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    p = ArgumentParser(prog="memory_estimate.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=list(PRESETS),
                   help=f"presets ({', '.join(PRESETS)}) or model folders with a config.json (default: both presets)")
    p.add_argument("--len", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="sequence lengths")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward (train.py's --micro-batch)")
    p.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS,
                   help=f"tokens per optimizer step (train.py's --batch-tokens, default {BATCH_TOKENS}): with "
                        "--len, --micro-batch and the GPUs it gives the micro-batches per GPU")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="train.py's --dtype (default bf16)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8], help="FSDP world sizes to show (default 1 8)")
    p.add_argument("--out", default="runs/memory_estimate", help="folder for memory_estimate.json/.csv")
    args = p.parse_args()
    check(min(args.gpus) >= 1 and min(args.len) >= 2 and args.micro_batch >= 1,
          "--gpus and --micro-batch must be >= 1, --len >= 2")
    models = {}
    for name in args.model:
        if name in PRESETS:
            models[name] = preset(name)
        elif Path(name).is_dir():
            models[Path(name).name] = read_config(Path(name))
        else:
            raise RopeliteError(f"--model {name}: neither a preset ({', '.join(PRESETS)}) nor a model folder")
    rows = table_rows(models, args.len, args.gpus, args.micro_batch, args.dtype, args.batch_tokens)
    write_results(args.out, "memory_estimate", rows)
    print(f"Training memory per GPU (GiB), {args.dtype}, micro-batch {args.micro_batch}, train.py's micro-batches per "
          f"GPU for --batch-tokens {args.batch_tokens}, checkpointing unless said, CUDA context "
          f"({CUDA_CONTEXT / GIB} GiB) included: COMPUTED, NOT MEASURED. rs/ag: GiB each GPU sends per step in "
          f"reduce-scatters (sync on the last micro-batch / every one) and all-gathers\n")
    print(markdown(rows))
    print(f"\nwritten: {args.out}/memory_estimate.json, .csv")


if __name__ == "__main__":
    run_script(main)
