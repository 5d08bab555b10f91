"""Training memory of train.py per --len, COMPUTED (not measured), for SmolLM2-135M and LLaMa-2-7B or any config.

    python benchmarks/memory_estimate.py                                   # the README table: 4K/8K/16K/32K
    python benchmarks/memory_estimate.py --model path/to/model --len 8192 65536 --gpus 1 8 --micro-batch 2

The recipe is train.py's: AdamW with fp32 master weights, fp32 gradients and two fp32 moments (16 bytes per
parameter), bf16 autocast compute (fp32 residual stream: the embedding output and the residual adds stay fp32
under autocast), gradient checkpointing per block, flash attention (O(len) memory: q, k, v, the output and the
log-sum-exp), and the loss made 1024 positions at a time. Under FSDP the 16 bytes per parameter are divided by
the number of GPUs, plus the unsharded weights (bf16 with --dtype bf16: FSDP2's MixedPrecisionPolicy, which also
makes the residual stream bf16 and needs no autocast copies) and fp32 gradients of the groups in flight. With
several micro-batches per rank, FSDP keeps the unsharded fp32 gradients between them (no reduce-scatter but the
last micro-batch's): 4 bytes per parameter more, not counted here (the default 32K run on 8 GPUs has one).

Activations per token of one block (C hidden, F SwiGLU inner, H/Hkv heads of d, r = 4 bytes of the residual
stream, a = 2 bytes (bf16) or 4 (fp32) of matmul outputs), i.e. what autograd keeps for backward:
    RMSNorm x2: its fp32 input and normed output, and the output itself   5rC (input of norm 1 = block input)
    bf16 casts of the q/k/v and gate/up inputs                             2aC (bf16 only)
    q, k after RoPE, v, the attention output and its o_proj input         a(3H + 2Hkv)d, plus 4H (log-sum-exp)
    gate, up, silu(gate), silu(gate)*up                                    4aF
With checkpointing only each block's input (rC per token) is kept for all L blocks; one block is recomputed at a
time in backward, and its gradients in flight add about 3aF + 2rC per token. Without it all L blocks' sets stay.
The loss keeps the final hidden states and their gradient (3rC + rC per token) and, per chunk, fp32 logits,
log-softmax and their gradient (12 bytes x chunk x vocab, plus the bf16 matmul output); its backward comes before
the blocks', so the activation peak is the kept inputs + the larger of the loss peak and one block's peak.
The lean mode (train.py --lean, one GPU): bf16 weights (2 bytes) and gradients (2) and torchao's AdamW8bit moments,
two 8-bit codes per parameter plus one fp32 scale per block of 256 (2 + 8/256), about 6 bytes per parameter; no
bf16 casts (the weights are bf16) and a bf16 residual stream (r = 2 for the kept block inputs). Its optimizer
step works one parameter at a time in fp32 (weight, gradient, two moments: 16 bytes x the largest parameter),
after backward has freed the activations, so it is the larger of the two, not their sum.
Not counted: the CUDA context and the caching allocator's slack (add ~1-2 GiB), NCCL buffers.
benchmarks/bench_train.py checks this against CPU-measured peak memory on small configs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ropelite.cli import ArgumentParser, run_script
from ropelite.errors import RopeliteError
from ropelite.io import write_results
from ropelite.hf import read_config
from ropelite.model import LlamaConfig
from ropelite.presets import PRESETS, preset

GIB = 2**30
LOSS_CHUNK = 1024  # model.nll's chunk_size


def block_params(c: LlamaConfig) -> int:
    attention = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    return attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size


def root_params(c: LlamaConfig) -> int:
    """Embeddings, lm_head (once when tied) and the final norm: FSDP's root group."""
    return c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.hidden_size


def param_count(c: LlamaConfig) -> int:
    return c.num_hidden_layers * block_params(c) + root_params(c)


LEAN_BYTES_PER_PARAM = 2 + 2 + 2 * (1 + 4 / 256)  # bf16 weight + bf16 gradient + AdamW8bit's m, v with scales


def estimate(c: LlamaConfig, length: int, micro_batch: int = 1, dtype: str = "bf16", grad_ckpt: bool = True,
             gpus: int = 1, loss_chunk: int = LOSS_CHUNK, lean: bool = False) -> dict:
    """Peak training memory in bytes, by part, for one process of ``gpus`` (``lean``: train.py --lean, 1 GPU)."""
    C, F, H, Hkv, d, L, V = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                             c.head_dim, c.num_hidden_layers, c.vocab_size)
    if lean and (gpus != 1 or dtype != "bf16"):
        raise RopeliteError("the lean mode is bf16 on one GPU")
    # bf16 weights (lean, or FSDP2's bf16 parameters) make a bf16 residual stream and need no autocast copies
    bf16_weights = dtype == "bf16" and (lean or gpus > 1)
    r, a = (2 if bf16_weights else 4), (2 if dtype == "bf16" else 4)
    n = micro_batch * length                                        # tokens in one forward
    P = param_count(c)
    states = (LEAN_BYTES_PER_PARAM if lean else 16) * P / gpus      # fp32 weights + grads + AdamW m, v, or lean
    # FSDP: a block is all-gathered (in the compute dtype) for the current and the prefetched one, with its
    # unsharded gradient (fp32 for the reduce-scatter); the root group stays gathered through the loss.
    gathered = (2 if bf16_weights else 4) + 4
    in_flight = 0 if gpus == 1 else 2 * gathered * block_params(c) + gathered * root_params(c)
    casts = (2 * block_params(c) + 2 * V * C) if dtype == "bf16" and not bf16_weights else 0  # autocast's copies
    saved_block = 5 * r * C + (2 * a * C if dtype == "bf16" else 0) + a * (3 * H + 2 * Hkv) * d + 4 * H + 4 * a * F
    backward_block = 3 * a * F + 2 * r * C                          # gradients in flight, incl. d(block input)
    kept = n * L * r * C if grad_ckpt else n * L * (r * C + saved_block)
    # Backward first runs the loss (the final hidden states and a chunk's logits), then the blocks one by one:
    # the two peaks do not coincide.
    loss_peak = n * 4 * r * C + micro_batch * min(loss_chunk, length) * V * (12 + (2 if dtype == "bf16" else 0))
    block_peak = n * (backward_block + (saved_block if grad_ckpt else 0))
    activations = kept + max(loss_peak, block_peak)
    optimizer_step = 16 * max(V * C, c.hidden_size * c.intermediate_size) if lean else 0
    return {"params": P, "states": states, "fsdp_in_flight": in_flight, "casts": casts,
            "activations": activations, "optimizer_step": optimizer_step,
            "total": states + in_flight + max(casts + activations, optimizer_step)}


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


def table_rows(models: dict[str, LlamaConfig], lengths, gpus_list, micro_batch: int, dtype: str) -> list[dict]:
    rows = []
    for name, config in models.items():
        for length in lengths:
            row = {"model": name, "params_M": round(param_count(config) / 1e6, 1), "len": length,
                   "micro_batch": micro_batch, "dtype": dtype}
            ckpt = estimate(config, length, micro_batch, dtype, True, 1)
            row.update({"states_GiB": round(ckpt["states"] / GIB, 2),
                        "activations_GiB": round(ckpt["activations"] / GIB, 2)})
            for gpus in gpus_list:
                total = estimate(config, length, micro_batch, dtype, True, gpus)["total"]
                row[f"total_{gpus}gpu_GiB"] = round(total / GIB, 2)
            no_ckpt = estimate(config, length, micro_batch, dtype, False, 1)["total"]
            row["total_1gpu_no_ckpt_GiB"] = round(no_ckpt / GIB, 2)
            if dtype == "bf16":
                lean = estimate(config, length, micro_batch, dtype, True, 1, lean=True)
                row["lean_states_GiB"] = round(lean["states"] / GIB, 2)
                row["total_1gpu_lean_GiB"] = round(lean["total"] / GIB, 2)
            row["note"] = "computed, not measured"
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = [k for k in rows[0] if k not in ("note", "dtype", "micro_batch")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[k]) for k in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    p = ArgumentParser(prog="memory_estimate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=list(PRESETS),
                   help=f"presets ({', '.join(PRESETS)}) or model folders with a config.json (default: both presets)")
    p.add_argument("--len", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="sequence lengths")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward (train.py's --micro-batch)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="train.py's --dtype (default bf16)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8], help="FSDP world sizes to show (default 1 8)")
    p.add_argument("--out", default="runs/memory_estimate", help="folder for memory_estimate.json/.csv")
    args = p.parse_args()
    models = {}
    for name in args.model:
        if name in PRESETS:
            models[name] = preset(name)
        elif Path(name).is_dir():
            models[Path(name).name] = read_config(Path(name))
        else:
            raise RopeliteError(f"--model {name}: neither a preset ({', '.join(PRESETS)}) nor a model folder")
    rows = table_rows(models, args.len, args.gpus, args.micro_batch, args.dtype)
    write_results(args.out, "memory_estimate", rows)
    print(f"Training memory per GPU (GiB), {args.dtype}, micro-batch {args.micro_batch}, gradient checkpointing "
          f"unless said: COMPUTED, NOT MEASURED (CUDA context and allocator slack not included)\n")
    print(markdown(rows))
    print(f"\nwritten: {args.out}/memory_estimate.json, .csv")


if __name__ == "__main__":
    run_script(main)
