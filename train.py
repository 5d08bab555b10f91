"""Token-matched long-context finetuning of a LLaMa with a RoPE extension, on one GPU or sharded with FSDP2.

    python train.py --rope yarn --len 32768 --data my-corpus/  # SmolLM2 (L = 8192), YaRN s = 32768/8192 = 4
    # the seed paper's ablation: the same RoPE (fix --factor, or ntk's --base) trained at 4K and at 32K,
    # on the same token budget
    python train.py --rope yarn --factor 4 --len 4096 --data my-corpus/ --out runs/yarn4-4k
    python train.py --rope yarn --factor 4 --len 32768 --data my-corpus/ --out runs/yarn4-32k
    python train.py --rope ntk --base 1e6 --len 16384 --tokens 50M
    python train.py --model path/to/llama-2-7b --rope pi --len 32768      # any Hugging Face LLaMa folder
    torchrun --nproc_per_node 8 train.py --model path/to/llama-2-7b --rope yarn --len 32768
    python train.py --resume --out runs/yarn4-32k           # continue that run exactly where it stopped
    python train.py --init random --len 512 --tokens 2M --device cpu --out runs/scratch   # a small model from scratch

What one optimizer step is: --batch-tokens tokens = batch_tokens / len sequences of --len tokens, run as
micro-batches of --micro-batch sequences (gradient accumulation; with torchrun each rank takes its share of the
micro-batches). The run lasts --tokens tokens whatever --len is, so a 4K run and a 32K run see the same text
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
not recompute attention) and, with --dtype bf16 (the default on CUDA), bf16 autocast compute over fp32
master weights and AdamW states in one process, or FSDP2's bf16 parameters with fp32 gradient reduction under
torchrun (ropelite/parallel.py); --lean keeps bf16 weights with torchao's 8-bit AdamW (stochastic bf16 rounding),
which fits a LLaMa-2-7B at 32K on one 80 GB GPU by the estimator; RoPE angles are fp32 in every case.

--out holds the trained model as a folder that ropelite and transformers both load unchanged (config.json, whose
rope_scaling and "ropelite" record say which RoPE, factor, theta, original and new length it was trained with;
model.safetensors in fp32; the tokenizer files), metrics.jsonl (one row per step: loss in nats/token, lr,
grad norm, tokens, tokens/s, peak memory), eval.jsonl (the held-out loss and perplexity before the first step,
every --eval-every steps and at the end) and checkpoint/ (the same model + optimizer, data position and RNG,
written atomically every --save-every steps) and .lock (the pid of the run that holds the folder: a second run
on it stops with a one-line error). A killed run continues with --resume --out DIR, which takes every other flag
from the checkpoint, and ends with the same weights, bit for bit, as one never interrupted. The first
SIGINT/SIGTERM (Ctrl-C, a job's time limit) finishes the step in progress, saves a checkpoint and exits with
status 128 + signal and a line saying how to resume; a second one kills at once. A NaN/inf loss stops the run
before it touches the weights and leaves the last good checkpoint in place.

--init random trains a new model from scratch (smoke tests, coursework): its shape comes from --layers
--hidden --heads --kv-heads --ffn --theta --orig-len, its tokens are UTF-8 bytes (vocabulary 257, EOS = 256) for
text data (the folder then holds a tokenizer_config.json naming ropelite's ByteTokenizer, which ropelite.load
reads), or the ids of pre-tokenised data (.npy/.bin; vocabulary = largest id + 2, EOS = largest id + 1).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ropelite.cli import DTYPES, ArgumentParser, add_data_args, add_model_args, check, run_script, token_bar, torch_device
from ropelite.data import PackedSequences, load_documents, pack_documents
from ropelite.errors import RopeliteError
from ropelite.io import append_jsonl, lock_out, truncate_jsonl, write_json
from ropelite.hf import config_to_hf, load_model, model_from_state, read_config
from ropelite.model import Llama, LlamaConfig
from ropelite.parallel import (compile_blocks, lean_weights, make_optimizer, set_learning_rate, shard,
                               sync_on_last_micro_batch)
from ropelite.rope import VARIANTS, RopeConfig
from ropelite.tokenizer import ByteTokenizer, first_id, load_tokenizer
from ropelite.training import (OPTIMIZER_STATE, SCHEDULES, accumulate_gradients, clip_gradients, evaluate_nll,
                               latest_checkpoint, learning_rate, load_trainer_state, peak_memory_mb, random_model,
                               rng_state, save_checkpoint, set_rng_state)

# A resumed run must be the same run: --resume takes every flag from the checkpoint but these of the invocation
# itself, and those that do not change the numbers the run computes, which may be given anew (--micro-batch
# regroups the same sum: equal up to float rounding; --keep-attention saves what it would recompute). Any other
# flag given must equal the checkpoint's.
PER_INVOCATION = {"resume", "out", "stop_after", "quiet", "device"}
MAY_CHANGE = {"save_every", "eval_every", "micro_batch", "epochs_ok", "compile", "keep_attention"}
DAY_S = 86400  # a run estimated longer than this on this device gets a notice up front
METRICS, EVAL_LOG = "metrics.jsonl", "eval.jsonl"  # in --out: one row per step; one per held-out evaluation


def token_count(text: str) -> int:
    """'262144', '100M', '1e8', '256Ki' -> an int (k/M/G decimal, Ki/Mi/Gi binary)."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    match = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)(|k|m|g|ki|mi|gi)", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 262144, 100M, 1e8, 256Ki)")
    return int(float(match[1]) * units[match[2]])


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, overrides={
        "--factor": dict(help="scale factor s >= 1 of the RoPE extension (default: len / L, L = the model's "
                              "original context; 1 when len <= L; a line says so, since the RoPE then changes "
                              "with --len: fix --factor to compare lengths)"),
        "--device": dict(help="torch device of this invocation, also on --resume (default: cuda when available, "
                              "else cpu)"),
        "--dtype": dict(default=None, help="compute dtype: bf16 = bf16 autocast over fp32 master weights and "
                                           "AdamW states; fp32 = fp32 throughout; fp16 is refused (it needs loss "
                                           "scaling) (default: bf16 on CUDA, fp32 on CPU)")})
    g = p.add_argument_group("budget")
    g.add_argument("--len", type=int, default=32768, help="training sequence length in tokens (default 32768)")
    g.add_argument("--tokens", type=token_count, default=400 * 262144,
                   help="total training tokens, the same at any --len (default 104857600 = 400 steps of the "
                        "default --batch-tokens, YaRN's step count)")
    g.add_argument("--batch-tokens", type=token_count, default=262144,
                   help="tokens per optimizer step; batch_tokens // len sequences per step (default 262144 = "
                        "YaRN's 64 sequences at 4K, 8 at 32K)")
    g.add_argument("--micro-batch", type=int, default=1,
                   help="sequences per forward/backward; the step accumulates gradients over "
                        "sequences_per_step / (micro_batch * ranks) of them (default 1)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5, YaRN's)")
    g.add_argument("--warmup", type=int, default=20,
                   help="linear warmup from 0 over this many steps: lr = peak * step / warmup for the 0-based "
                        "steps before it (default 20, YaRN's); a run of no more steps never reaches --lr (a "
                        "warning says so)")
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
                        "len (default off; the same gradients either way; see README, 'A training step')")
    g.add_argument("--seed", type=int, default=0, help="seed of --init random (default 0)")
    g = p.add_argument_group("GPU speed and memory")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each block (the first steps compile; off by default)")
    g.add_argument("--lean", action="store_true",
                   help="one GPU, little memory: bf16 weights and gradients and torchao's 8-bit AdamW with "
                        "stochastic bf16 rounding, ~6 bytes per parameter instead of 16 (a LLaMa-2-7B at 32K fits "
                        "80 GB: benchmarks/memory_estimate.py, column total_1gpu_lean_GiB); needs "
                        "pip install 'ropelite[lean]'")
    add_data_args(p, "mixed")
    p.add_argument("--epochs-ok", action="store_true",
                   help="allow a --tokens budget larger than the training data, read more than once (otherwise "
                        "an error says how many epochs it would take)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run folder (default runs/train/MODEL-ROPE-LEN)")
    g.add_argument("--save-every", type=int, default=50,
                   help="checkpoint every N steps, and always at the end; 0 = only at the end (default 50)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint: every flag not given is the checkpoint's "
                        "(a line lists those that differ from the defaults); given anew may be --device, "
                        "--stop-after, --quiet, --save-every, --eval-every, --micro-batch, --epochs-ok; any "
                        "other given must equal the checkpoint's")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="end this invocation after N more steps, with a checkpoint (to fit a job's time limit); "
                        "continue with --resume")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
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
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def flags_given(argv=None) -> set[str]:
    """The dests of the flags written on the command line (a default is not given, even when equal to one)."""
    p, unset = build_parser(), object()
    # argparse fills in a default only where the namespace lacks the attribute: pre-set, it stays ``unset``
    seen = p.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(p.parse_args(argv)), unset)))
    return {key for key, value in vars(seen).items() if value is not unset}


# --------------------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    """Where this process stands: rank among world processes; mesh is None without torchrun."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.mesh is not None:
            torch.distributed.barrier()

    def say(self, *parts) -> None:
        """Progress and notices on stderr, from the main process only, each on its own line above any bar."""
        if self.main:
            tqdm.write(" ".join(map(str, parts)), file=sys.stderr)


def setup_distributed(device: str) -> Dist:
    """Under torchrun (WORLD_SIZE > 1): one process per GPU with NCCL, or per CPU process with gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch_device(device)
    if world == 1:
        return Dist(device=device)
    from torch.distributed.device_mesh import init_device_mesh
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device, init_device_mesh(device.type, (world,)))


def check_flags(args) -> None:
    """The flags' own rules; the RoPE's (factor >= 1, --base only for ntk) are RopeConfig's, checked as it is built."""
    check(args.len >= 2, f"--len must be at least 2 tokens, got {args.len}")
    check(args.dtype != "fp16", "--dtype fp16 needs loss scaling, which train.py does not do: use bf16")
    check(args.micro_batch >= 1, f"--micro-batch must be >= 1, got {args.micro_batch}")
    check(args.grad_ckpt or not args.keep_attention, "--keep-attention keeps attention under --grad-ckpt, which "
          "--no-grad-ckpt turns off (everything is kept then)")
    check(args.lr > 0 and args.warmup >= 0 and args.clip >= 0, "--lr must be > 0, --warmup and --clip >= 0")
    check(args.save_every >= 0, f"--save-every must be >= 0, got {args.save_every}")
    check(args.stop_after is None or args.stop_after >= 1, "--stop-after must be >= 1")
    check(args.batch_tokens >= args.len,
          f"--batch-tokens {args.batch_tokens} is less than one sequence of --len {args.len}")


def lock_run_folder(out: Path, dist: Dist) -> None:
    """Rank 0 makes and locks --out (ropelite.io.lock_out, held until the process ends); every rank learns the
    outcome, so the others stop with it instead of waiting in a collective for a rank 0 that has stopped."""
    message = None
    if dist.main:
        try:
            lock_out(out)
        except RopeliteError as e:
            message = str(e)
    if dist.mesh is not None:
        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        if not dist.main:
            raise SystemExit(2)  # rank 0 says it
        raise RopeliteError(message)


def prepare_out(out: Path, resume: bool) -> Path | None:
    """Check that --out (made and locked) holds a run exactly when --resume says so. Returns the checkpoint."""
    checkpoint = latest_checkpoint(out)
    if resume:
        check(checkpoint is not None, f"nothing to resume: {out} holds no checkpoint")
    else:
        check(checkpoint is None, f"{out} already holds a run; pass --resume to continue it, or another --out")
        check(not (out / "config.json").exists(), f"{out} already holds a model (config.json); choose another --out")
    return checkpoint


def _flag(key: str, value) -> str:
    """A flag as the command line writes it: --len 32, --betas 0.9 0.95, --grad-ckpt / --no-grad-ckpt."""
    name = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} " + (" ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))


def resume_flags(saved: dict, args, given: set[str], dist: Dist) -> None:
    """Make ``args`` (in place) the flags of the run in the checkpoint (``saved``): each flag not ``given`` is the
    checkpoint's, one given must equal it unless it is PER_INVOCATION or MAY_CHANGE. One line lists what was
    taken and differs from this invocation's defaults."""
    as_value = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731  (JSON/argparse lists vs tuples)
    taken = []
    for key, was in saved.items():
        if key not in vars(args) or key in PER_INVOCATION:
            continue
        now = getattr(args, key)
        if key in given:
            check(key in MAY_CHANGE or as_value(was) == as_value(now),
                  f"--{key.replace('_', '-')} is {as_value(now)!r} but the run in --out was started with "
                  f"{as_value(was)!r}; --resume takes the run's flags itself: leave it out")
            continue
        if as_value(was) != as_value(now):
            taken.append(_flag(key, was))
        setattr(args, key, was)
    dist.say("resume: from the checkpoint: " + (" ".join(taken) if taken else "every flag at its default"))


def default_factor(rope: str, length: int, original: int, given: float | None) -> float | None:
    """--factor, else len / L for the variants that take one (1 when len <= L); None leaves the config's."""
    if given is not None:
        return given
    if not VARIANTS[rope].scales_by_factor:  # plain RoPE has no factor; longrope's comes with its searched lists
        return None
    return max(1.0, length / original)


def random_config(args, vocab: int, eos: int) -> LlamaConfig:
    check(args.hidden % args.heads == 0, f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    check(args.heads % args.kv_heads == 0, f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    original = args.orig_len or args.len
    return LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.ffn or 4 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                       eos_token_id=eos,
                       rope=RopeConfig(theta=args.theta, original_max_position_embeddings=original))


def random_vocabulary(docs: list) -> tuple[object, int, int]:
    """(tokenizer, vocab size, EOS id) of a new model: bytes for text, else one past the data's largest id."""
    arrays = [d for d in docs if isinstance(d, np.ndarray)]
    if len(arrays) < len(docs):
        return ByteTokenizer(), ByteTokenizer.vocab_size, ByteTokenizer.eos_id
    largest = max(int(a.max()) for a in arrays if a.size)  # a negative id is tokenize_checked's error, in packing
    return None, largest + 2, largest + 1


def copy_tokenizer_files(source: Path, out: Path) -> None:
    """Everything of the source model folder but its weights and config: the tokenizer, generation config."""
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model") and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)


# --------------------------------------------------------------------------------------------------------------
# Preparing the run: everything that bad input can fail, before any weight is loaded
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One run, as decided before its first weight exists."""
    args: argparse.Namespace
    out: Path
    checkpoint: Path | None       # the checkpoint to resume from, None for a new run
    state: dict | None            # its trainer state: step, data position, RNG, flags
    config: LlamaConfig           # the model, with the RoPE it trains with
    source: Path | None           # the pretrained model's folder; None for --init random
    overrides: dict               # the RoPE flags, as load_model takes them
    steps: int                    # optimizer steps of the whole run
    per_step: int                 # sequences per optimizer step, over all ranks
    sequences: PackedSequences    # the training stream: sequence i is a pure function of i
    held_out: list                # this rank's (1, len) held-out sequences; [] = no evaluation

    @property
    def step_tokens(self) -> int:
        """Tokens of one optimizer step, over all ranks: the unit of --tokens and of every log's "tokens"."""
        return self.per_step * self.args.len

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.args.dtype]


def choose_model(args, docs: list) -> tuple[LlamaConfig, Path | None, object, int]:
    """(the model's own config, its folder (None for --init random), its tokenizer or None, the EOS id)."""
    if args.init == "random":
        tokenizer, vocab, eos = random_vocabulary(docs)
        return random_config(args, vocab, eos), None, tokenizer, eos
    from ropelite.hub import resolve_model
    source = resolve_model(args.model)
    base = read_config(source)
    tokenizer = load_tokenizer(source)
    eos = tokenizer.eos_id if tokenizer is not None else first_id(base.eos_token_id)
    check(eos is not None, f"{args.model} names no EOS token, which separates packed documents")
    return base, source, tokenizer, eos


def budget(args, world: int) -> tuple[int, int]:
    """(steps, sequences per step): --tokens in steps of --batch-tokens, each split evenly over the ranks."""
    per_step = args.batch_tokens // args.len
    step_tokens = per_step * args.len
    steps = args.tokens // step_tokens
    check(steps >= 1, f"--tokens {args.tokens} is less than one optimizer step ({per_step} sequences of "
                      f"{args.len} = {step_tokens} tokens); raise --tokens or lower --batch-tokens")
    check(per_step % (args.micro_batch * world) == 0,
          f"{per_step} sequences per step do not split into micro-batches of {args.micro_batch} on "
          f"{world} process(es); choose --micro-batch / --batch-tokens so that they do")
    return steps, per_step


def held_out_set(args, rest: list, tokenizer, eos: int, vocab: int, step_tokens: int, dist: Dist) -> list:
    """This rank's (1, len) held-out sequences from ``rest``, the documents after those the training stream
    holds (so never trained on); [] when there is none. Every rank scores the same number of sequences, because an
    FSDP forward is a collective that all ranks must join."""
    eval_tokens = step_tokens if args.eval_tokens is None else args.eval_tokens
    per_rank = math.ceil(math.ceil(eval_tokens / args.len) / dist.world)
    if not per_rank:
        return []
    if not rest:
        dist.say("eval: the training stream takes every document, none is left to hold out: no evaluation "
                 "(give more --data or a smaller --tokens, or --eval-tokens 0 to silence this)")
        return []
    stream, used = pack_documents(rest, tokenizer, eos, per_rank * dist.world * args.len, vocab)
    if stream.size < args.len:
        dist.say(f"eval: the {used} documents left after the training stream hold {stream.size} tokens, less "
                 f"than one sequence of {args.len}: no evaluation (give more --data, or --eval-tokens 0)")
        return []
    held = PackedSequences(stream, args.len)
    dist.say(f"eval: {per_rank * dist.world} held-out sequences of {args.len} tokens from {used} documents "
             f"({stream.size:,} distinct tokens) before step 1, every {args.eval_every} steps and at the end")
    return [held.batch(dist.rank * per_rank + i, 1).to(dist.device) for i in range(per_rank)]


def open_run(args, given: set[str], dist: Dist) -> tuple[Path, Path | None, dict | None]:
    """Lock --out and find its checkpoint; a resumed run takes its flags from it (``args`` changes in place),
    then the flags are checked. Returns (--out, the checkpoint or None, its trainer state or None)."""
    out = Path(args.out or f"runs/train/{Path(args.model).name if args.init == 'pretrained' else 'random'}"
                           f"-{args.rope or 'own'}-{args.len}")
    lock_run_folder(out, dist)
    checkpoint = prepare_out(out, args.resume)
    state = load_trainer_state(checkpoint) if checkpoint else None
    if state is not None:
        resume_flags(state["args"], args, given, dist)
    args.dtype = args.dtype or ("bf16" if dist.device.type == "cuda" else "fp32")
    check_flags(args)
    return out, checkpoint, state


def check_epochs(args, tokens: int, stream_size: int, dist: Dist) -> None:
    """A budget of ``tokens`` over a stream of ``stream_size`` distinct tokens: more than one epoch needs
    --epochs-ok, and a run too short to finish its warmup is worth a word."""
    epochs = tokens / stream_size
    check(epochs <= 1 or args.epochs_ok,
          f"the budget of {tokens:,} tokens would read the training data ({stream_size:,} tokens) "
          f"{epochs:.2f} times ({math.ceil(epochs)} epochs): pass --data with at least {tokens:,} tokens of "
          f"text, lower --tokens, or pass --epochs-ok to repeat the data")
    steps = tokens // (args.batch_tokens // args.len * args.len)
    if steps <= args.warmup:
        dist.say(f"warning: the run has {steps} steps, no more than --warmup {args.warmup}: its largest lr is "
                 f"{args.lr * (steps - 1) / args.warmup:.3g}, never --lr {args.lr:g}")


def prepare(args, given: set[str], dist: Dist) -> Run:
    """Lock and check --out and the flags (a resumed run's from its checkpoint); choose the model and its RoPE
    (RopeConfig checks the RoPE flags); size the budget; pack the training stream and the held-out set; put the
    tokenizer in a new run's --out."""
    out, checkpoint, state = open_run(args, given, dist)
    docs = load_documents(args.data, kind=args.builtin)
    base, source, tokenizer, eos = choose_model(args, docs)
    original = base.rope.original_max_position_embeddings
    factor = default_factor(args.rope or base.rope.type, args.len, original, args.factor)
    if factor is not None and args.factor is None and checkpoint is None:
        dist.say(f"rope: --factor not given, so s = max(1, len / L) = max(1, {args.len} / {original}) = {factor:g}; "
                 f"a run at another --len trains another RoPE: give --factor to compare lengths")
    # --base goes to RopeConfig whatever --rope is, so that it, not train.py, refuses it on another variant
    overrides = {"rope": args.rope, "factor": factor, **({} if args.base is None else {"base": args.base})}
    config = read_config(checkpoint) if checkpoint else base.with_rope(**overrides)

    steps, per_step = budget(args, dist.world)
    step_tokens = per_step * args.len
    stream, used = pack_documents(docs, tokenizer, eos, steps * step_tokens, config.vocab_size)
    micro = per_step // (args.micro_batch * dist.world)
    checkpointing = "off" if not args.grad_ckpt else "on, keeping attention" if args.keep_attention else "on"
    dist.say(f"train: {config.rope.describe()} (theta {config.rope.theta:g}, L {original} -> len {args.len}), "
             f"{steps} steps x {per_step} sequences x {args.len} tokens = {steps * step_tokens:,} tokens (of "
             f"--tokens {args.tokens:,}); {micro} micro-batch(es) of {args.micro_batch} x {dist.world} "
             f"process(es); {args.dtype}, grad-ckpt {checkpointing}")
    dist.say(f"data: {stream.size:,} tokens from {used} of {len(docs)} documents; the run reads it "
             f"{steps * step_tokens / stream.size:.2f} times")
    check_epochs(args, steps * step_tokens, stream.size, dist)
    held_out = held_out_set(args, docs[used:], tokenizer, eos, config.vocab_size, step_tokens, dist)
    if dist.main and not args.resume:
        if isinstance(tokenizer, ByteTokenizer):
            write_json(out / "tokenizer_config.json", ByteTokenizer.config())
        elif source is not None and tokenizer is not None:
            copy_tokenizer_files(source, out)
    return Run(args, out, checkpoint, state, config, source, overrides, steps, per_step,
               PackedSequences(stream, args.len), held_out)


# --------------------------------------------------------------------------------------------------------------
# The model, its checkpoints and its held-out loss
# --------------------------------------------------------------------------------------------------------------

def source_model(run: Run, where) -> Llama:
    """The weights to start from, fp32 on ``where``: the checkpoint's, the pretrained ones, or new ones."""
    if run.checkpoint:
        return load_model(run.checkpoint, dtype=torch.float32, device=where)
    if run.source is not None:
        return load_model(run.source, dtype=torch.float32, device=where, **run.overrides)
    return random_model(run.config, run.args.seed).to(where)


def build_model(run: Run, dist: Dist) -> Llama:
    """fp32 master weights on the device, or sharded over the ranks (rank 0 reads them, then broadcasts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    torch.manual_seed(run.args.seed)
    if dist.mesh is None:
        model = source_model(run, dist.device)
    else:
        full = source_model(run, "cpu").state_dict() if dist.main else {}
        with torch.device("meta"):
            model = Llama(run.config)
        shard(model, dist.mesh, run.dtype)  # bf16 all-gathers and compute, fp32 gradient reduction
        model.to_empty(device=dist.device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
    model.gradient_checkpointing, model.keep_attention = run.args.grad_ckpt, run.args.keep_attention
    model.train()
    return model


def restore(run: Run, model: Llama, optimizer, dist: Dist) -> int:
    """The step to start from: 0 for a new run, else the checkpoint's, its optimizer state and RNG put back."""
    if run.state is None:
        return 0
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    options = (StateDictOptions() if dist.mesh is None else
               StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    optim_state = load_trainer_state(run.checkpoint, OPTIMIZER_STATE) if dist.main else {}
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
    del optim_state
    set_rng_state(run.state["rng"], dist.device)
    start = run.state["step"]
    check(run.state["sequences"] == start * run.per_step, "the checkpoint's data position does not match its step")
    dist.say(f"resuming {run.checkpoint} at step {start} of {run.steps}")
    return start


def save(run: Run, model: Llama, optimizer, step: int, dist: Dist) -> None:
    """out/checkpoint at ``step`` (model, optimizer, data position, RNG), and the model published in out."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)  # collectives: every rank calls them
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.main:
        args = run.args
        record = {**config_to_hf(run.config)["ropelite"],
                  "trained": {"len": args.len, "step": step, "steps": run.steps, "tokens": step * run.step_tokens,
                              "batch_tokens": run.step_tokens, "init": args.init,
                              "model": args.model if args.init == "pretrained" else None}}
        save_checkpoint(run.out, model_from_state(run.config, model_state),
                        {"step": step, "sequences": step * run.per_step, "tokens": step * run.step_tokens,
                         "rng": rng_state(dist.device), "args": vars(args)},
                        optim_state, extra_config={"ropelite": record})
    dist.barrier()


def evaluate(run: Run, model: Llama, step: int, dist: Dist) -> None:
    """Mean next-token NLL of the held-out sequences with the current weights, appended to eval.jsonl; a bar
    counts the tokens scored (all ranks')."""
    tokens = len(run.held_out) * dist.world * run.args.len
    bar = token_bar(tokens, f"eval at step {step}") if dist.main and not run.args.quiet else None
    try:
        nll = evaluate_nll(model, run.held_out, run.dtype,
                           progress=None if bar is None else lambda n: bar.update(n * dist.world))
    finally:
        if bar is not None:
            bar.close()
    if dist.mesh is not None:
        torch.distributed.all_reduce(nll)
    sequences = len(run.held_out) * dist.world
    loss = nll.item() / (sequences * (run.args.len - 1))
    if dist.main:
        append_jsonl(run.out / EVAL_LOG, {"step": step, "eval_loss": loss, "eval_ppl": math.exp(loss),
                                          "eval_tokens": sequences * run.args.len, "tokens": step * run.step_tokens})
    dist.say(f"eval at step {step}: held-out loss {loss:.4f} (ppl {math.exp(loss):.3f})")


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------

def optimizer_step(run: Run, model: Llama, optimizer, step: int, dist: Dist,
                   progress=None) -> tuple[float, float, float]:
    """Optimizer step ``step`` (0-based) on this rank's share of its sequences: (mean loss over all ranks in
    nats/token, gradient norm before clipping, learning rate); ``progress(tokens)`` after each micro-batch. A
    non-finite loss or norm stops the run here, before the weights change."""
    args = run.args
    lr = learning_rate(step, args.lr, args.warmup, run.steps, args.schedule)
    set_learning_rate(optimizer, lr)
    per_rank = run.per_step // dist.world
    first = step * run.per_step + dist.rank * per_rank  # this rank's sequences of the global step
    batches = [run.sequences.batch(first + i, args.micro_batch).to(dist.device)
               for i in range(0, per_rank, args.micro_batch)]
    n_predicted = run.per_step * (args.len - 1)  # next-token targets in one step (the last token predicts nothing)
    with sync_on_last_micro_batch(model, len(batches)):  # FSDP: one reduce-scatter per step
        nll = accumulate_gradients(model, batches, n_predicted, run.dtype, scale=dist.world, progress=progress)
    if dist.mesh is not None:
        torch.distributed.all_reduce(nll)
    loss = nll.item() / n_predicted
    norm = clip_gradients(model, args.clip)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        last = latest_checkpoint(run.out)
        kept = (f"the last good checkpoint is {last} (step {load_trainer_state(last)['step']})" if last
                else "no checkpoint was saved yet")
        raise RopeliteError(f"loss {loss} (gradient norm {norm}) at step {step + 1}: stopped before updating "
                            f"the weights; {kept}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, lr


class Progress:
    """The run's bar in tokens of all ranks, moved after every micro-batch so that its rate and ETA come with the
    first one, and a notice then when the rest of the run would take more than a day on this device."""

    def __init__(self, run: Run, start: int, dist: Dist):
        self.total, self.done = run.steps * run.step_tokens, start * run.step_tokens
        self.world, self.dist = dist.world, dist
        self.bar = (token_bar(self.total, f"train {run.config.rope.describe()} @{run.args.len}")
                    if dist.main and not run.args.quiet else None)
        if self.bar is not None:
            self.bar.initial = self.bar.n = self.done  # the rate counts this invocation's tokens only
            self.bar.refresh()
        self.began, self.estimated = time.perf_counter(), False

    def micro_batch(self, tokens: int) -> None:
        """``tokens`` = this rank's micro-batch; every rank runs one at the same time."""
        tokens *= self.world
        self.done += tokens
        if self.bar is not None:
            self.bar.update(tokens)
        if not self.estimated:
            self.estimated = True
            rate = tokens / (time.perf_counter() - self.began)
            left = (self.total - self.done) / rate
            if left > DAY_S:
                self.dist.say(f"notice: at the first micro-batch's {rate:,.0f} tokens/s this run needs about "
                              f"{left / DAY_S:.1f} days more on {self.dist.device}: a GPU-scale run (see --tokens, "
                              f"--len, --device)")

    def step(self, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopSignal:
    """Within ``with``: the first SIGINT/SIGTERM only records itself (``signum``), so the run can finish its step
    and save; it also puts the previous handlers back, so a second signal acts as usual (Ctrl-C raises
    KeyboardInterrupt, SIGTERM kills). Outside the main thread, where Python cannot catch signals, it does
    nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.previous = 0, {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread
            self.previous = {s: signal.signal(s, self._caught) for s in self.SIGNALS}
        return self

    def _caught(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    def agreed(self, dist: Dist) -> int:
        """The signal any rank caught (0: none): every rank must stop at the same step, for the save's collectives."""
        if dist.mesh is None:
            return self.signum
        caught = torch.tensor([self.signum], device=dist.device)
        torch.distributed.all_reduce(caught, op=torch.distributed.ReduceOp.MAX)
        return int(caught.item())


def fit(run: Run, model: Llama, optimizer, start: int, dist: Dist) -> int:
    """Steps ``start`` .. until the run ends, --stop-after or a first SIGINT/SIGTERM: one metrics.jsonl row
    each, held-out evaluation every --eval-every steps and checkpoints every --save-every, both at the end too.
    Returns the last step; a signal ends with a checkpoint and SystemExit(128 + signal) instead."""
    args, device = run.args, dist.device
    progress = Progress(run, start, dist)
    began, done, signum = time.perf_counter(), start, 0
    try:
        with StopSignal() as stopper:
            for step in range(start, run.steps):
                tick = time.perf_counter()
                loss, norm, lr = optimizer_step(run, model, optimizer, step, dist, progress.micro_batch)
                done = step + 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - tick
                if dist.main:
                    append_jsonl(run.out / METRICS, {
                        "step": done, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": done * run.step_tokens,
                        "tokens_per_s": run.step_tokens / seconds, "peak_mem_mb": peak_memory_mb(device),
                        "mem": "cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss",
                        "elapsed_s": time.perf_counter() - began})
                progress.step(loss, lr)
                signum = stopper.agreed(dist)
                stop = signum or (args.stop_after is not None and done - start >= args.stop_after)
                if run.held_out and (done == run.steps or (args.eval_every and done % args.eval_every == 0)):
                    evaluate(run, model, done, dist)
                if done == run.steps or stop or (args.save_every and done % args.save_every == 0):
                    save(run, model, optimizer, done, dist)
                if stop:
                    break
    finally:
        progress.close()
    if signum and done < run.steps:  # a signal during the last step changes nothing: the run is complete
        dist.say(f"train: stopped by {signal.Signals(signum).name} after step {done} of {run.steps}, saved in "
                 f"{run.out / 'checkpoint'}; continue with: train.py --resume --out {run.out}")
        raise SystemExit(128 + signum)
    return done


def train(args, dist: Dist, given: set[str] = frozenset()) -> Path:
    """Prepare, build (or restore) the model, then fit; returns --out. ``given``: the flags on the command line,
    the others a resumed run takes from its checkpoint."""
    run = prepare(args, given, dist)
    model = build_model(run, dist)
    if args.lean:
        model = lean_weights(model, dist.world)
    if args.compile:
        compile_blocks(model)
    optimizer = make_optimizer(model, args.lr, tuple(args.betas), args.wd, dist.device, lean=args.lean)
    start = restore(run, model, optimizer, dist)
    if dist.main:
        truncate_jsonl(run.out / METRICS, start)
        # A resumed run keeps its checkpoint step's held-out row (written before that save); a new run, perhaps
        # in the folder of one killed before its first checkpoint, scores step 0 afresh.
        truncate_jsonl(run.out / EVAL_LOG, start if start else -1)
    if run.held_out and start == 0:
        evaluate(run, model, 0, dist)
    done = fit(run, model, optimizer, start, dist)
    dist.say(f"train: {run.out} holds step {done} of {run.steps}" +
             ("" if done == run.steps else "; continue with --resume"))
    return run.out


def main(argv=None) -> Path:
    args = parse_args(argv)
    dist = setup_distributed(args.device)
    try:
        out = train(args, dist, flags_given(argv))
        if dist.mesh is not None:
            torch.distributed.barrier()  # every rank done before the group is torn down (gloo aborts otherwise)
        return out
    finally:
        if dist.mesh is not None:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_script(main)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose run is complete, saved and whose process group is destroyed leaves without the
        # interpreter's own teardown, where gloo's threads now and then abort the process ("terminate called
        # without an active exception", seen under load), failing a finished run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
