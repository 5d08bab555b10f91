"""Token-matched long-context finetuning of a LLaMa with a RoPE extension, on one GPU or sharded with FSDP2.

    python train.py --rope yarn --len 32768 --data my-corpus/  # SmolLM2 (L = 8192), YaRN s = 32768/8192 = 4
    # the seed paper's ablation: the same RoPE (fix --factor, or ntk's --base) trained at 4K and at 32K,
    # on the same token budget
    python train.py --rope yarn --factor 4 --len 4096 --data my-corpus/ --out runs/yarn4-4k
    python train.py --rope yarn --factor 4 --len 32768 --data my-corpus/ --out runs/yarn4-32k
    python train.py --rope ntk --base 1e6 --len 16384 --tokens 50M --data my-corpus/
    python train.py --model path/to/llama-2-7b --rope pi --len 32768 --data my-corpus/   # any Hugging Face LLaMa
    torchrun --nproc_per_node 8 train.py --model path/to/llama-2-7b --rope yarn --len 32768 --data my-corpus/
    python train.py --resume --out runs/yarn4-32k           # continue that run exactly where it stopped
    python train.py --rope yarn --len 32768 --data my-corpus/ --dry-run   # the plan, without reading a weight
    python train.py --init random --len 128 --tokens 64Ki --device cpu    # a small model from scratch, ~20 s
    python train.py --init random --device cpu --out runs/scratch  # len 512, 1Mi tokens: minutes on a CPU

What one optimizer step is: --batch-tokens tokens = batch_tokens / len sequences of --len tokens, run as
micro-batches of --micro-batch sequences (gradient accumulation; with torchrun each rank takes its share of the
micro-batches); left out, it is YaRN's 262,144 tokens, or --tokens / 400 for a smaller budget (a line says
which). The run lasts --tokens tokens whatever --len is, so a 4K run and a 32K run see the same text
budget. Documents (--data, default the built-in corpus of ropelite.data) are tokenised, joined as
doc EOS doc EOS ... in their given order, and cut into --len-token sequences without document masks, as YaRN
trains. A budget larger than the data is refused unless --epochs-ok (then the stream starts over; the epoch
count is printed): the built-in corpus holds about 1.3M tokens, so real runs bring their own --data.

The RoPE: --rope picks the variant (default: the checkpoint's own) and --factor s defaults to len / L, L being
the model's original context (config rope original_max_position_embeddings; s = 1 when len <= L); a line says
so whenever the factor is derived, since then runs at different --len train different RoPEs.
Training is full finetuning with AdamW (defaults: YaRN's and PI's recipe, betas 0.9 0.95, no weight decay,
lr 2e-5), a linear warmup from 0 then --schedule, gradient clipping, the chunked loss
(no len x vocab logits), scaled_dot_product_attention (flash on GPU), gradient checkpointing per block
(--no-grad-ckpt to turn it off; --keep-attention keeps the attention outputs as well, so that backward does
not recompute attention) and, with --dtype bf16 (auto on CUDA and native-bf16 CPUs), bf16 autocast compute
over fp32 master weights and AdamW states in one process, or FSDP2's bf16 parameters with fp32 gradient reduction
under torchrun (ropelite/parallel.py); --lean keeps bf16 weights with torchao's 8-bit AdamW (stochastic bf16 rounding),
which fits a LLaMa-2-7B at 32K on one 80 GB GPU by the estimator; RoPE angles are fp32 in every case.

--out holds the trained model as a folder that ropelite and transformers both load unchanged (config.json, whose
rope_scaling and "ropelite" record say which RoPE, factor, theta, original and new length it was trained with,
and its "trained" block how: len, step of steps, sequences_per_step, batch_tokens, tokens, the lr schedule, init;
model.safetensors in fp32, gathered and written one tensor at a time, when the run ends or --stop-after stops
it; the tokenizer files), metrics.jsonl (one row per step: loss in nats/token, lr, grad norm, tokens, tokens/s,
peak memory, elapsed_s: the run's seconds so far over all its invocations), eval.jsonl (the held-out loss and
perplexity before the first step, every --eval-every steps and at the end) and checkpoint/ (every --save-every
steps, written atomically: the weights and AdamW moments sharded with torch.distributed.checkpoint, each process
writing and reading its own part, so no process ever holds the whole state; the data position, each process's
RNG and the flags) and .lock (the pid of the run that holds the folder: a second run on it stops with a one-line
error). A killed run continues with --resume --out DIR, which takes every other flag from the checkpoint, and
ends with the same weights, bit for bit, as one never interrupted; it may resume on another number of processes
(the shards are resharded; then the gradient sums run in another order, equal to float rounding). The first
SIGINT/SIGTERM (Ctrl-C, a job's time limit) finishes the step in progress, saves a checkpoint and exits with
status 128 + signal and a line saying how to resume; a second one kills at once. A NaN/inf loss stops the run
before it touches the weights and leaves the last good checkpoint in place.

--init random trains a new model from scratch (smoke tests, coursework): its shape comes from --layers
--hidden --heads --kv-heads --ffn --theta --orig-len, its tokens are UTF-8 bytes (vocabulary 257, EOS = 256) for
text data (the folder then holds a tokenizer_config.json naming ropelite's ByteTokenizer, which ropelite.load
reads), or the ids of pre-tokenised data (.npy/.bin; vocabulary = largest id + 2, EOS = largest id + 1).

This script is the command line of ropelite/trainer.py, where all of the above happens.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from ropelite.cli import ArgumentParser, add_data_args, add_model_args, run_script
from ropelite.trainer import (DEFAULT_LEN, DEFAULT_TOKENS, MAY_CHANGE, PER_INVOCATION, YARN_BATCH_TOKENS,
                              YARN_STEPS, train)
from ropelite.training import SCHEDULES


def token_count(text: str) -> int:
    """'262144', '100M', '1e8', '256Ki' -> an int (k/M/G decimal, Ki/Mi/Gi binary)."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    match = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)(|k|m|g|ki|mi|gi)", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 262144, 100M, 1e8, 256Ki)")
    return int(float(match[1]) * units[match[2]])


# the flags a --resume may give anew (ropelite.trainer decides which: those that leave the run's numbers as they are)
RESUME_MAY_GIVE = sorted(f"--{key.replace('_', '-')}" for key in (PER_INVOCATION | MAY_CHANGE) - {"resume", "out"})


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, overrides={
        "--factor": dict(help="scale factor s >= 1 of the RoPE extension (default: len / L, L = the model's "
                              "original context; 1 when len <= L; a line says so, since the RoPE then changes "
                              "with --len: fix --factor to compare lengths)"),
        "--device": dict(help="torch device of this invocation, also on --resume (default: cuda when available, "
                              "else cpu)"),
        "--dtype": dict(help="compute dtype: bf16 = bf16 autocast over fp32 master weights and AdamW states; "
                             "fp32 = fp32 throughout; fp16 is refused (it needs loss scaling); auto (default) = "
                             "bf16 where the device multiplies it natively (CUDA, a CPU with AMX/AVX512/ARM "
                             "BF16), else fp32; the checkpoint records the dtype that ran, which --resume keeps")})
    add_budget_and_optimizer_args(p)
    add_data_args(p, "mixed", why=": unlike the other scripts' books (0.95 MB, 4 documents), the pydoc prose and "
                  "stdlib code (5.2 MB, 247 documents) hold a from-scratch run's default budget and leave documents "
                  "after the trained ones for the held-out loss")
    p.add_argument("--epochs-ok", action="store_true",
                   help="allow a --tokens budget larger than the training data, read more than once (otherwise "
                        "an error says how many epochs it would take)")
    add_output_and_init_args(p)
    return p


def add_budget_and_optimizer_args(p: ArgumentParser) -> None:
    g = p.add_argument_group("budget")
    g.add_argument("--len", type=int, default=None,
                   help=f"training sequence length in tokens (default {DEFAULT_LEN['pretrained']}; "
                        f"{DEFAULT_LEN['random']} with --init random)")
    g.add_argument("--tokens", type=token_count, default=None,
                   help=f"total training tokens, the same at any --len (default {DEFAULT_TOKENS['pretrained']} = "
                        f"{YARN_STEPS} steps of {YARN_BATCH_TOKENS} tokens, YaRN's recipe; "
                        f"{DEFAULT_TOKENS['random']} with --init random, minutes on a CPU)")
    g.add_argument("--batch-tokens", type=token_count, default=None,
                   help=f"tokens per optimizer step; batch_tokens // len sequences per step (default: "
                        f"min({YARN_BATCH_TOKENS}, tokens / {YARN_STEPS}) in whole sequences, a multiple of "
                        f"--micro-batch x processes: YaRN's 64 sequences at 4K, 8 at 32K, and {YARN_STEPS} steps "
                        f"for a smaller budget; a line says so)")
    g.add_argument("--micro-batch", type=int, default=1,
                   help="sequences per forward/backward; the step accumulates gradients over "
                        "sequences_per_step / (micro_batch * ranks) of them (default 1)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5, YaRN's)")
    g.add_argument("--warmup", type=int, default=20,
                   help="linear warmup from 0 over this many steps: lr = peak * step / warmup for the 0-based "
                        "steps before it, so the first step updates with lr 0, as transformers' "
                        "get_linear_schedule_with_warmup and YaRN's recipe do (default 20, YaRN's); a run of no "
                        "more steps never reaches --lr (a warning says so)")
    g.add_argument("--schedule", default="linear", choices=SCHEDULES,
                   help="after warmup: linear to 0 (YaRN's), cosine to 0, or constant (default linear)")
    g.add_argument("--wd", type=float, default=0.0,
                   help="AdamW weight decay, on every weight (default 0, YaRN's and PI's)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("B1", "B2"),
                   help="AdamW betas (default 0.9 0.95, YaRN's and PI's)")
    g.add_argument("--clip", type=float, default=1.0, help="clip the global gradient norm to this; 0 = off "
                                                           "(default 1.0)")
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing per block: keep each block's input, recompute the rest in "
                        "backward (default on; --no-grad-ckpt skips the recompute: ~1/3 less compute, L times the "
                        "activation memory; see benchmarks/memory_estimate.py)")
    g.add_argument("--keep-attention", action=argparse.BooleanOptionalAction, default=False,
                   help="with --grad-ckpt, also keep each block's attention output so backward does not recompute "
                        "attention, the O(len^2) part: one more len x hidden tensor per block, a faster step at long "
                        "len (default off; the same gradients either way; measured in docs/results.md, 'Speed and "
                        "memory')")
    g.add_argument("--seed", type=int, default=0, help="seed of --init random (default 0)")
    g = p.add_argument_group("GPU speed and memory")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each block (the first steps compile; off by default)")
    g.add_argument("--lean", action="store_true",
                   help="one GPU, little memory: bf16 weights and gradients and torchao's 8-bit AdamW with "
                        "stochastic bf16 rounding, ~6 bytes per parameter instead of 16 (a LLaMa-2-7B at 32K fits "
                        "80 GB: benchmarks/memory_estimate.py, column total_1gpu_lean_GiB); needs "
                        "pip install 'ropelite[lean]'")
    g.add_argument("--sync-every-micro-batch", action="store_true",
                   help="under FSDP2 (torchrun), reduce-scatter the gradients after every micro-batch instead of only "
                        "the last: no unsharded fp32 gradients (4 bytes per parameter) held between micro-batches, "
                        "for runs that do not fit otherwise (LLaMa-2-7B at 4K on 8 GPUs: 17.1 instead of 39.0 GiB per "
                        "GPU), at the price of one reduce-scatter of all gradients per micro-batch instead of per "
                        "step (benchmarks/memory_estimate.py counts both); the same gradients up to fp32 rounding; "
                        "no effect on one process")


def add_output_and_init_args(p: ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run folder (default runs/train/MODEL-ROPE-LEN)")
    g.add_argument("--save-every", type=int, default=50,
                   help="checkpoint every N steps, and always at the end; 0 = only at the end (default 50)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint: every flag not given is the checkpoint's "
                        "(a line lists those that differ from the defaults); given anew may be "
                        f"{', '.join(RESUME_MAY_GIVE)}; any other given must equal the checkpoint's")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="end this invocation after N more steps, with a checkpoint (to fit a job's time limit); "
                        "continue with --resume")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--dry-run", action="store_true",
                   help="resolve everything (flags, a resumed run's too; model config and RoPE; budget; data and "
                        "held-out set), print the plan and exit before any weight is read; nothing is written. "
                        "Under torchrun (or with WORLD_SIZE set) it plans for that many processes; --device cuda "
                        "may be planned on a machine without one")
    g = p.add_argument_group("held-out evaluation")
    g.add_argument("--eval-tokens", type=token_count, default=None,
                   help="tokens of held-out text (documents after those the run trains on), in --len sequences, "
                        "scored before the first step, every --eval-every steps and at the end; 0 = no evaluation "
                        "(default: --batch-tokens, one step's worth)")
    g.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (default 50)")
    g = p.add_argument_group("--init random (a new model; --model is not read)")
    g.add_argument("--init", default="pretrained", choices=("pretrained", "random"),
                   help="pretrained: finetune --model (default); random: train a new model from scratch")
    g.add_argument("--layers", type=int, default=4, help="blocks (default 4)")
    g.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    g.add_argument("--heads", type=int, default=4, help="attention heads; head dim = hidden / heads (default 4)")
    g.add_argument("--kv-heads", type=int, default=2, help="key/value heads, dividing --heads (default 2)")
    g.add_argument("--ffn", type=int, default=None, help="SwiGLU inner size (default 4 * hidden)")
    g.add_argument("--theta", type=float, default=10000.0, help="RoPE base (default 10000)")
    g.add_argument("--orig-len", type=int, default=None,
                   help="the model's 'original' context L, the reference of --factor (default: --len)")


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def flags_given(argv=None) -> set[str]:
    """The dests of the flags written on the command line (a default is not given, even when equal to one)."""
    p, unset = build_parser(), object()
    # argparse fills in a default only where the namespace lacks the attribute: pre-set, it stays ``unset``
    seen = p.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(p.parse_args(argv)), unset)))
    return {key for key, value in vars(seen).items() if value is not unset}


def main(argv=None) -> Path | None:
    return train(parse_args(argv), flags_given(argv))


if __name__ == "__main__":
    run_script(main)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose run is complete, saved and whose process group is destroyed leaves without the
        # interpreter's own teardown, where gloo's threads now and then abort the process ("terminate called
        # without an active exception", seen under load), failing a finished run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
