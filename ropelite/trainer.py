"""The trainer behind train.py: token-matched long-context finetuning (or training from scratch) of a LLaMa with
a RoPE extension, in one process or sharded with FSDP2 under torchrun. train.py is its command line; ``train``
here is what a program calls with train.py's flags (``train.py --help`` explains each).

- Processes: ``Dist`` (rank, world, device, mesh) and ``setup_distributed``.
- The run, decided before its first weight exists (``prepare`` -> ``TrainingRun``): --out locked and checked,
  a resumed run's flags taken from its checkpoint, the model and its RoPE chosen, the token budget in steps,
  the packed training stream and the held-out sequences.
- The model (``build_model``), its checkpoints (``save``, ``restore``: sharded, each rank writing and reading its
  own part; bit-identical resume, also on another number of ranks up to the order of float sums), the Hugging
  Face export into --out (``export``, one tensor at a time) and its held-out loss (``evaluate``).
- One optimizer step (``optimizer_step``: learning rate, gradient accumulation with the loss passed in,
  clipping, update), the one every training loop of ropelite takes, the ablation's finetunes too.
- The loop (``fit``): metrics, evaluation and checkpoints on their schedules, the progress bar
  (``Progress``) and the first SIGINT/SIGTERM finishing the step and saving (``StopSignal``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .cli import DTYPES, check, resolve_dtype, resolve_factor, token_bar, torch_device
from .data import PackedSequences, load_documents, pack_documents
from .errors import RopeliteError
from .hf import config_to_hf, load_model, read_config
from .io import append_jsonl, lock_out, read_jsonl, truncate_jsonl, write_json, write_summary
from .model import Llama, LlamaConfig, attention_kernel_note
from .parallel import compile_blocks, lean_weights, make_optimizer, set_learning_rate, shard, sync_on_last_micro_batch
from .rope import RopeConfig
from .stats import Interval, bootstrap_mean, compare
from .tokenizer import ByteTokenizer, first_id, load_tokenizer
from .training import (LossFn, accumulate_gradients, checkpoint_state, clip_gradients, commit_checkpoint,
                       evaluate_nll, export_model, fresh_checkpoint_folder, latest_checkpoint, learning_rate,
                       load_trainer_state, next_token_nll, peak_memory_mb, random_model, read_shards, rng_state,
                       set_rng_state, trained_record, write_shards)

# A resumed run must be the same run: --resume takes every flag from the checkpoint but these of the invocation
# itself, and those that do not change the numbers the run computes, which may be given anew (--micro-batch
# and --sync-every-micro-batch regroup the same sum: equal up to float rounding; --keep-attention saves what it would recompute; --compile
# runs the same blocks compiled). Any other flag given must equal the checkpoint's.
PER_INVOCATION = {"resume", "out", "stop_after", "quiet", "device", "dry_run"}
MAY_CHANGE = {"save_every", "eval_every", "micro_batch", "epochs_ok", "compile", "keep_attention",
              "sync_every_micro_batch"}
DAY_S = 86400  # a run estimated longer than this on this device gets a notice up front
# The budget's defaults. A pretrained model's finetune follows YaRN's GPU recipe: 400 steps of 262,144 tokens
# (64 sequences at 4K, 8 at 32K). A new model (--init random) is sized for a CPU: minutes at a few thousand
# tokens/s.
YARN_BATCH_TOKENS, YARN_STEPS = 262144, 400
DEFAULT_LEN = {"pretrained": 32768, "random": 512}
DEFAULT_TOKENS = {"pretrained": YARN_STEPS * YARN_BATCH_TOKENS, "random": 2**20}
METRICS, EVAL_LOG = "metrics.jsonl", "eval.jsonl"  # in --out: one row per step; one per held-out evaluation


# --------------------------------------------------------------------------------------------------------------
# Processes
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


def planning_dist(device: str) -> Dist:
    """Where a dry run plans for, making no process group: torchrun's RANK and WORLD_SIZE (1 without it) and
    --device, which need not be present on this machine (a GPU run can be planned on a laptop)."""
    try:
        where = torch_device(device)
    except RopeliteError:
        if not device.startswith("cuda"):
            raise
        where = torch.device(device)
    return Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), where)


# --------------------------------------------------------------------------------------------------------------
# The flags: checked, and on --resume the checkpoint's
# --------------------------------------------------------------------------------------------------------------

def default_batch_tokens(tokens: int, length: int, unit: int) -> int:
    """--batch-tokens when not given: YaRN's 262,144 tokens per step, or --tokens / 400 when that is less, so that
    a small budget still takes YaRN's 400 steps; rounded down to whole sequences of ``length``, in a multiple of
    ``unit`` sequences (--micro-batch x processes: every rank takes whole micro-batches), at least one unit."""
    sequences = min(YARN_BATCH_TOKENS, tokens // YARN_STEPS) // length
    return max(unit, sequences // unit * unit) * length


def fill_defaults(args, dist: Dist) -> None:
    """The flags whose default depends on others, once those are known (a resumed run has them all from its
    checkpoint): --len and --tokens by --init (DEFAULT_LEN, DEFAULT_TOKENS), --batch-tokens by the budget
    (``default_batch_tokens``, said in one line), --dtype by the device."""
    args.len = DEFAULT_LEN[args.init] if args.len is None else args.len
    args.tokens = DEFAULT_TOKENS[args.init] if args.tokens is None else args.tokens
    if args.batch_tokens is None and args.len >= 1:  # a --len below 2 is check_flags' error
        unit = max(1, args.micro_batch * dist.world)
        args.batch_tokens = default_batch_tokens(args.tokens, args.len, unit)
        dist.say(f"budget: --batch-tokens not given, so min({YARN_BATCH_TOKENS}, --tokens / {YARN_STEPS}) in whole "
                 f"sequences of {args.len}, a multiple of {unit} (micro-batch x processes) = "
                 f"{args.batch_tokens // args.len} sequences = {args.batch_tokens:,} tokens per step")
    args.dtype = resolve_dtype(args.dtype, dist.device, log=dist.say)  # the checkpoint records what ran


def check_flags(args) -> None:
    """The flags' own rules; the RoPE's (factor >= 1, --base only for ntk) are RopeConfig's, checked as it is built."""
    check(args.len >= 2, f"--len must be at least 2 tokens, got {args.len}")
    check(args.dtype != "fp16", "--dtype fp16 needs loss scaling, which the trainer does not do: use bf16")
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


# --------------------------------------------------------------------------------------------------------------
# Preparing the run: everything that bad input can fail, before any weight is loaded
# --------------------------------------------------------------------------------------------------------------

def default_factor(checkpoint: RopeConfig, rope: str | None, length: int, base: float | None,
                   given: float | None) -> float | None:
    """--factor by the one rule of every script (``cli.resolve_factor``), train.py's default being len / L: the
    factor the training length asks for (1 when len <= L); None keeps the checkpoint's or needs none."""
    return resolve_factor(checkpoint, rope, given, base,
                          default=max(1.0, length / checkpoint.original_max_position_embeddings))


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


@dataclass
class TrainingRun:
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

    @property
    def n_predicted(self) -> int:
        """Next-token targets of one optimizer step, over all ranks (the last token of a sequence predicts none)."""
        return self.per_step * (self.args.len - 1)

    def learning_rate(self, step: int) -> float:
        return learning_rate(step, self.args.lr, self.args.warmup, self.steps, self.args.schedule)

    def micro_batches(self, step: int, dist: Dist) -> list[tuple[torch.Tensor]]:
        """This rank's share of optimizer step ``step``'s sequences, as (--micro-batch, len) token ids on its
        device: the global step's sequences are a contiguous range of the stream, split evenly over the ranks."""
        micro, per_rank = self.args.micro_batch, self.per_step // dist.world
        first = step * self.per_step + dist.rank * per_rank
        return [(self.sequences.batch(first + i, micro).to(dist.device),) for i in range(0, per_rank, micro)]

    def trained_record(self, step: int) -> dict:
        """config.json's ``ropelite`` record of the model after ``step`` steps (``training.trained_record``)."""
        args = self.args
        return trained_record(self.config, length=args.len, sequences_per_step=self.per_step, step=step,
                              steps=self.steps, lr=args.lr, warmup=args.warmup, schedule=args.schedule,
                              min_lr_ratio=0.0, init=args.init,
                              model=args.model if args.init == "pretrained" else None,
                              data={"paths": args.data} if args.data else {"builtin": args.builtin})


def choose_model(args, docs: list) -> tuple[LlamaConfig, Path | None, object, int]:
    """(the model's own config, its folder (None for --init random), its tokenizer or None, the EOS id)."""
    if args.init == "random":
        tokenizer, vocab, eos = random_vocabulary(docs)
        return random_config(args, vocab, eos), None, tokenizer, eos
    from .hub import resolve_model
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


def open_run(args, given: set[str], dist: Dist, lock: bool = True) -> tuple[Path, Path | None, dict | None]:
    """Lock --out (unless ``lock`` is off: a dry run only reads) and find its checkpoint; a resumed run takes its
    flags from it (``args`` changes in place); the defaults that depend on other flags are filled in and the
    flags checked. Returns (--out, the checkpoint or None, its trainer state or None)."""
    out = Path(args.out or f"runs/train/{Path(args.model).name if args.init == 'pretrained' else 'random'}"
                           f"-{args.rope or 'own'}-{DEFAULT_LEN[args.init] if args.len is None else args.len}")
    if lock:
        lock_run_folder(out, dist)
    checkpoint = prepare_out(out, args.resume)
    state = load_trainer_state(checkpoint) if checkpoint else None
    if state is not None:
        resume_flags(state["args"], args, given, dist)
    fill_defaults(args, dist)
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


def prepare(args, given: set[str], dist: Dist, dry_run: bool = False) -> TrainingRun:
    """Lock and check --out and the flags (a resumed run's from its checkpoint); choose the model and its RoPE
    (RopeConfig checks the RoPE flags); size the budget; pack the training stream and the held-out set; put the
    tokenizer in a new run's --out. A ``dry_run`` does all of it but the lock and the writing."""
    out, checkpoint, state = open_run(args, given, dist, lock=not dry_run)
    docs = load_documents(args.data, kind=args.builtin)
    base, source, tokenizer, eos = choose_model(args, docs)
    original = base.rope.original_max_position_embeddings
    factor = default_factor(base.rope, args.rope, args.len, args.base, args.factor)
    if factor is not None and args.factor is None and checkpoint is None:
        dist.say(f"rope: --factor not given, so s = max(1, len / L) = max(1, {args.len} / {original}) = {factor:g}; "
                 f"a run at another --len trains another RoPE: give --factor to compare lengths")
    # --base goes to RopeConfig whatever --rope is, so that it, not the trainer, refuses it on another variant
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
    if dist.main and not args.resume and not dry_run:
        if isinstance(tokenizer, ByteTokenizer):
            write_json(out / "tokenizer_config.json", ByteTokenizer.config())
        elif source is not None and tokenizer is not None:
            copy_tokenizer_files(source, out)
    return TrainingRun(args, out, checkpoint, state, config, source, overrides, steps, per_step,
               PackedSequences(stream, args.len), held_out)


# --------------------------------------------------------------------------------------------------------------
# The model, its checkpoints and its held-out loss
# --------------------------------------------------------------------------------------------------------------


def source_model(run: TrainingRun, where) -> Llama:
    """A new run's weights, fp32 on ``where``: the pretrained ones, or new ones."""
    if run.source is not None:
        return load_model(run.source, dtype=torch.float32, device=where, **run.overrides)
    return random_model(run.config, run.args.seed).to(where)


def build_model(run: TrainingRun, dist: Dist) -> Llama:
    """fp32 master weights on the device, sharded over the ranks under torchrun. A new run's are ``source_model``'s
    (under torchrun rank 0 reads them and broadcasts each rank its shards); a resumed run's model is made empty
    here, and ``restore`` fills it, each rank reading its own shards of the checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    torch.manual_seed(run.args.seed)
    if dist.mesh is None and run.checkpoint is None:
        model = source_model(run, dist.device)
    elif dist.mesh is None:
        with torch.device(dist.device):  # not meta: to_empty would untie tied embeddings outside FSDP
            model = Llama(run.config)
    else:
        with torch.device("meta"):
            model = Llama(run.config)
        shard(model, dist.mesh, run.dtype)  # bf16 all-gathers and compute, fp32 gradient reduction
        model.to_empty(device=dist.device)
        if run.checkpoint is None:
            full = source_model(run, "cpu").state_dict() if dist.main else {}
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                                        broadcast_from_rank0=True))
            del full
    model.gradient_checkpointing, model.keep_attention = run.args.grad_ckpt, run.args.keep_attention
    model.train()
    return model


def restore(run: TrainingRun, model: Llama, optimizer, dist: Dist) -> int:
    """The step to start from: 0 for a new run; else the checkpoint's, after each rank has read its shards of the
    weights and AdamW moments into ``model`` and ``optimizer`` (on any number of ranks: DCP reshards) and its RNG
    state (rank 0's where the checkpoint was written by another number of ranks: only the one-process lean mode
    draws random numbers, for its stochastic rounding)."""
    if run.state is None:
        return 0
    read_shards(run.checkpoint, model, optimizer)
    states = run.state["rng"]
    set_rng_state(states[dist.rank] if len(states) == dist.world else states[0], dist.device)
    start = run.state["step"]
    check(run.state["sequences"] == start * run.per_step, "the checkpoint's data position does not match its step")
    dist.say(f"resuming {run.checkpoint} at step {start} of {run.steps}" +
             ("" if len(states) == dist.world else f", written by {len(states)} process(es), on {dist.world}"))
    return start


def save(run: TrainingRun, model: Llama, optimizer, step: int, elapsed_s: float, dist: Dist) -> None:
    """out/checkpoint at ``step``: every rank writes its own shards of the weights and AdamW moments (no rank
    gathers the model), then rank 0 the trainer state (data position, every rank's RNG, the ``elapsed_s`` of
    training so far, the flags) and the model's config.json, and renames the folder into place."""
    folder = fresh_checkpoint_folder(run.out, clear=dist.main)
    dist.barrier()  # the folder is empty before any rank writes into it
    write_shards(checkpoint_state(model, optimizer), folder)  # a collective: every rank calls it
    states = [rng_state(dist.device)]
    if dist.mesh is not None:
        states = [None] * dist.world
        torch.distributed.all_gather_object(states, rng_state(dist.device))
    if dist.main:
        commit_checkpoint(run.out, {"step": step, "sequences": step * run.per_step, "tokens": step * run.step_tokens,
                                    "elapsed_s": elapsed_s, "processes": dist.world, "rng": states,
                                    "args": vars(run.args)},
                          {**config_to_hf(run.config), "ropelite": run.trained_record(step)})
    dist.barrier()


def export(run: TrainingRun, model: Llama, step: int, dist: Dist) -> None:
    """--out itself becomes the model after ``step`` (``export_model``: gathered one tensor at a time)."""
    export_model(model, run.config, run.out, {"ropelite": run.trained_record(step)}, write=dist.main)
    dist.barrier()


def evaluate(run: TrainingRun, model: Llama, step: int, dist: Dist) -> None:
    """Mean next-token NLL of the held-out sequences with the current weights, with a bootstrap 95 % interval over
    the sequences, appended to eval.jsonl; a bar counts the tokens scored (all ranks')."""
    tokens = len(run.held_out) * dist.world * run.args.len
    bar = token_bar(tokens, f"eval at step {step}") if dist.main and not run.args.quiet else None
    try:
        sums = evaluate_nll(model, run.held_out, run.dtype,
                            progress=None if bar is None else lambda n: bar.update(n * dist.world))
    finally:
        if bar is not None:
            bar.close()
    if dist.mesh is not None:  # every rank's sequences, for the interval over all of them
        parts = [torch.empty_like(sums) for _ in range(dist.world)]
        torch.distributed.all_gather(parts, sums)
        sums = torch.cat(parts)
    per_sequence = (sums / (run.args.len - 1)).cpu().numpy()   # mean NLL: each sequence has len - 1 targets
    loss, ppl = bootstrap_mean(per_sequence), bootstrap_mean(per_sequence, transform=math.exp)
    if dist.main:
        append_jsonl(run.out / EVAL_LOG, {"step": step, **loss.fields("eval_loss"), **ppl.fields("eval_ppl"),
                                          "eval_tokens": len(sums) * run.args.len, "tokens": step * run.step_tokens})
    dist.say(f"eval at step {step}: held-out loss {loss.text('.4f')} sequences (ppl {ppl.estimate:.3f})")


def write_eval_summary(run: TrainingRun) -> None:
    """train_summary.json: the held-out loss before the first step and at the last evaluation, with intervals
    over the held-out sequences, and whether they separate."""
    rows = read_jsonl(run.out / EVAL_LOG)
    if len(rows) < 2:
        return
    first, last = (Interval(r["eval_loss"], r.get("eval_loss_low"), r.get("eval_loss_high"), r["eval_loss_n"],
                            "bootstrap") for r in (rows[0], rows[-1]))
    verdict = {"lower": "lower, the intervals separate", "higher": "higher, the intervals separate",
               "overlap": "the intervals overlap: the data cannot tell", "unknown": "too few sequences for an interval"}
    a = run.args
    line = (f"held-out loss {first.text('.3f')} at step {rows[0]['step']} -> {last.text('.3f')} at step "
            f"{rows[-1]['step']} (n = held-out sequences of {a.len} tokens; {run.config.rope.describe()} at len "
            f"{a.len}, {rows[-1]['tokens']:,} training tokens): {verdict[compare(last, first)]}")
    write_summary(run.out, "train", "Finetuning with the extended RoPE: held-out loss",
                  "the seed paper finetunes every extension (YaRN's recipe) before measuring it: a finetune should "
                  "lower the held-out loss of the model under its new RoPE", [line],
                  {"first": first.fields("eval_loss"), "last": last.fields("eval_loss"), "len": a.len,
                   "rope": run.config.rope.describe(), "steps": rows[-1]["step"]})


# --------------------------------------------------------------------------------------------------------------
# One optimizer step, and the loop around it
# --------------------------------------------------------------------------------------------------------------

class NonFiniteLoss(RopeliteError):
    """A step's loss or gradient norm is inf or NaN: raised before the weights change."""

    def __init__(self, loss: float, norm: float):
        super().__init__(f"loss {loss} (gradient norm {norm}): stopped before updating the weights")


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[tuple[torch.Tensor, ...]],
                   lr: float, n_predicted: int, loss_fn: LossFn = next_token_nll, dtype: torch.dtype = torch.float32,
                   clip: float = 1.0, world: int = 1, progress: Callable[[int], None] | None = None,
                   sync_every_micro_batch: bool = False) -> tuple[float, float]:
    """One update of ``model`` from this process's micro-batches of an optimizer step: the learning rate set to
    ``lr``; the gradients of ``loss_fn`` (default the plain next-token NLL; the ablation passes its weighted one)
    accumulated, divided by the step's ``n_predicted`` targets of all ``world`` processes
    (``accumulate_gradients``; under FSDP2 reduced once, after the last micro-batch); the global gradient norm
    clipped to ``clip`` (0 = off); ``optimizer``'s update (AdamW in train.py and the ablation). Returns (the
    step's mean NLL over all processes in nats/token, the gradient norm before clipping); ``progress(tokens)``
    after each micro-batch; ``sync_every_micro_batch``: FSDP2 reduce-scatters after every micro-batch instead (no
    unsharded gradients held between them, more communication). A non-finite loss or norm raises NonFiniteLoss
    here, before the weights change."""
    set_learning_rate(optimizer, lr)
    with sync_on_last_micro_batch(model, len(micro_batches), sync_every_micro_batch):  # FSDP: once per step
        nll = accumulate_gradients(model, micro_batches, n_predicted, dtype, scale=world, progress=progress,
                                   loss_fn=loss_fn)
    if world > 1:
        torch.distributed.all_reduce(nll)
    loss = nll.item() / n_predicted
    norm = clip_gradients(model, clip)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise NonFiniteLoss(loss, norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm


def kept_checkpoint(out: Path) -> str:
    """What a run stopped by a non-finite loss leaves to continue from."""
    last = latest_checkpoint(out)
    return (f"the last good checkpoint is {last} (step {load_trainer_state(last)['step']})" if last
            else "no checkpoint was saved yet")


RATE_WINDOW = 20  # optimizer steps that the bar's tokens/s and ETA average over


def window_rate(marks) -> float | None:
    """Tokens per second from the first to the last of ``marks``, (seconds, tokens done) pairs: the average over
    that window, pauses (evaluation, checkpoints) included, so that an ETA drawn from it counts them too. None
    while no time has passed."""
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else None


class Progress:
    """The run's bar in tokens of all ranks, moved after every micro-batch, with the tokens/s and ETA of the last
    RATE_WINDOW optimizer steps (``window_rate``: one step's rate swings with evaluations, checkpoints and the
    machine's load; tqdm's own would follow each micro-batch); once the loop ends, the rate is this invocation's
    average. After the first micro-batch, a notice when the rest of the run would take more than a day on this
    device. ``clock``: seconds, for tests."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, run: TrainingRun, start: int, dist: Dist, clock: Callable[[], float] = time.perf_counter):
        self.total, self.done = run.steps * run.step_tokens, start * run.step_tokens
        self.world, self.dist, self.clock = dist.world, dist, clock
        self.marks = deque([(clock(), self.done)], maxlen=RATE_WINDOW + 1)  # at each step's end, and the start
        self.first, self.estimated, self.losses = self.marks[0], False, ""
        self.bar = (token_bar(self.total, f"train {run.config.rope.describe()} @{run.args.len}")
                    if dist.main and not run.args.quiet else None)
        if self.bar is not None:
            self.bar.bar_format = self.FORMAT  # the rate and ETA are ours, in the postfix
            self.bar.initial = self.bar.n = self.done
            self.bar.refresh()

    def rate(self) -> float | None:
        """Tokens/s over the window of steps, up to now (the step in progress included)."""
        return window_rate([*self.marks, (self.clock(), self.done)])

    def average(self) -> float | None:
        """Tokens/s of this invocation so far."""
        return window_rate([self.first, (self.clock(), self.done)])

    def postfix(self, rate: float | None, final: bool = False) -> str:
        if rate is None:
            return self.losses
        left = "" if final else f", ETA {tqdm.format_interval((self.total - self.done) / rate)}"
        return f"{tqdm.format_sizeof(rate)} tok/s{' on average' if final else ''}{left}{self.losses}"

    def micro_batch(self, tokens: int) -> None:
        """``tokens`` = this rank's micro-batch; every rank runs one at the same time."""
        self.done += tokens * self.world
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(self.rate()), refresh=False)
            self.bar.update(tokens * self.world)
        if not self.estimated:
            self.estimated = True
            rate = self.average()
            left = (self.total - self.done) / rate if rate else 0.0
            if left > DAY_S:
                self.dist.say(f"notice: at the first micro-batch's {rate:,.0f} tokens/s this run needs about "
                              f"{left / DAY_S:.1f} days more on {self.dist.device}: a GPU-scale run (see --tokens, "
                              f"--len, --device)")

    def step(self, loss: float, lr: float) -> None:
        """An optimizer step ended: the window moves on."""
        self.marks.append((self.clock(), self.done))
        self.losses = f", loss {loss:.4f}, lr {lr:.2e}"
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(self.rate()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(self.average(), final=True))
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


def fit(run: TrainingRun, model: Llama, optimizer, start: int, dist: Dist) -> int:
    """Steps ``start`` .. until the run ends, --stop-after or a first SIGINT/SIGTERM: one metrics.jsonl row
    each, held-out evaluation before the first step, every --eval-every steps and at the end, checkpoints every
    --save-every steps and at the end. A row's ``elapsed_s`` counts the run's seconds in this loop over every
    invocation (a resumed run starts from its checkpoint's), so the last row says how long the run took.
    Returns the last step; a signal ends with a checkpoint and SystemExit(128 + signal) instead."""
    args, device = run.args, dist.device
    began, before = time.perf_counter(), run.state["elapsed_s"] if run.state else 0.0
    elapsed = lambda: before + time.perf_counter() - began  # noqa: E731
    if run.held_out and start == 0:
        evaluate(run, model, 0, dist)
    progress = Progress(run, start, dist)
    done, signum = start, 0
    try:
        with StopSignal() as stopper:
            for step in range(start, run.steps):
                tick, lr = time.perf_counter(), run.learning_rate(step)
                try:
                    loss, norm = optimizer_step(model, optimizer, run.micro_batches(step, dist), lr, run.n_predicted,
                                                dtype=run.dtype, clip=args.clip, world=dist.world,
                                                progress=progress.micro_batch,
                                                sync_every_micro_batch=args.sync_every_micro_batch)
                except NonFiniteLoss as e:
                    raise RopeliteError(f"step {step + 1}: {e}; {kept_checkpoint(run.out)}") from None
                done = step + 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - tick
                if dist.main:
                    append_jsonl(run.out / METRICS, {
                        "step": done, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": done * run.step_tokens,
                        "tokens_per_s": run.step_tokens / seconds, "peak_mem_mb": peak_memory_mb(device),
                        "mem": "cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss",
                        "elapsed_s": elapsed()})
                progress.step(loss, lr)
                signum = stopper.agreed(dist)
                stop = signum or (args.stop_after is not None and done - start >= args.stop_after)
                if run.held_out and (done == run.steps or (args.eval_every and done % args.eval_every == 0)):
                    evaluate(run, model, done, dist)
                if done == run.steps or stop or (args.save_every and done % args.save_every == 0):
                    save(run, model, optimizer, done, elapsed(), dist)
                if stop:
                    break
    finally:
        progress.close()
    if signum and done < run.steps:  # a signal during the last step changes nothing: the run is complete
        dist.say(f"train: stopped by {signal.Signals(signum).name} after step {done} of {run.steps}, saved in "
                 f"{run.out / 'checkpoint'}; continue with: train.py --resume --out {run.out}")
        raise SystemExit(128 + signum)
    return done


def train_process(args: argparse.Namespace, dist: Dist, given: set[str] = frozenset()) -> Path:
    """This process's part of ``train``: prepare, build (or restore) the model, fit, and export the model into
    --out (when the run is complete or stopped by --stop-after; a signal leaves only the checkpoint)."""
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
    done = fit(run, model, optimizer, start, dist)
    export(run, model, done, dist)
    if dist.main and done == run.steps:
        write_eval_summary(run)
    dist.say(f"train: {run.out} holds step {done} of {run.steps}" +
             ("" if done == run.steps else "; continue with --resume"))
    return run.out


def plan(args: argparse.Namespace, given: set[str] = frozenset()) -> TrainingRun:
    """--dry-run: the run ``prepare`` decides (flags, model config and RoPE, budget, data, held-out set), printed
    as the lines of a plan, for the processes torchrun would start; no weight is read, nothing is written."""
    dist = planning_dist(args.device)
    run = prepare(args, given, dist, dry_run=True)
    c, a = run.config, run.args
    with torch.device("meta"):  # shapes only: no memory, no weights
        model = Llama(c)
    parameters = sum(p.numel() for p in model.parameters())
    if a.lean:
        model = lean_weights(model, dist.world)  # its rules as the run meets them: one process, bf16 weights
    optimizer = make_optimizer(model, a.lr, tuple(a.betas), a.wd, dist.device, lean=a.lean)  # (lean: torchao)
    micro = run.per_step // (a.micro_batch * dist.world)
    lines = [
        f"model: {'new (--init random, seed ' + str(a.seed) + ')' if run.source is None else run.source}, "
        f"{parameters:,} parameters: {c.num_hidden_layers} blocks, hidden {c.hidden_size}, {c.num_attention_heads} "
        f"heads / {c.num_key_value_heads} kv heads of {c.head_dim}, ffn {c.intermediate_size}, vocab {c.vocab_size}",
        f"rope: {c.rope.describe()} (theta {c.rope.theta:g}, L {c.rope.original_max_position_embeddings} -> "
        f"len {a.len})",
        f"budget: {run.steps} steps x {run.per_step} sequences x {a.len} tokens = {run.steps * run.step_tokens:,} "
        f"tokens; lr {a.lr:g}, warmup {a.warmup}, then {a.schedule}",
        f"processes: {dist.world} on {dist.device} ({'FSDP2 shards' if dist.world > 1 else 'one process'}), "
        f"{micro} micro-batch(es) of {a.micro_batch} each per step, {a.dtype}, "
        f"{'bf16' if a.lean else 'fp32'} weights, {type(optimizer).__name__}"
        f"{' (fused)' if optimizer.defaults.get('fused') else ''}, "
        f"grad-ckpt {'on' if a.grad_ckpt else 'off'}{', compiled blocks' if a.compile else ''}",
        f"out: {run.out}: " + (f"resumes {run.checkpoint} at step {run.state['step']}; " if run.state else "") +
        f"checkpoint every {a.save_every or run.steps} steps, held-out eval "
        + (f"every {a.eval_every} steps" if run.held_out else "off") + ", the model exported at the end",
    ]
    if dist.device.type == "cuda":
        lines.append(attention_kernel_note(c, dist.device, run.dtype))
    if dist.main:
        print("\n".join(f"plan: {line}" for line in lines) +
              "\ndry run: nothing trained, no weight read, nothing written")
    return run


def train(args: argparse.Namespace, given: set[str] = frozenset()) -> Path | None:
    """Train as train.py's flags ``args`` say (``train.py --help`` explains each), in this process or, under
    torchrun, in each of its processes; returns --out (None for --dry-run, which prints the ``plan``).
    ``given``: the flags written on the command line; on --resume the others are taken from the checkpoint."""
    if args.dry_run:
        plan(args, given)
        return None
    dist = setup_distributed(args.device)
    try:
        out = train_process(args, dist, given)
        dist.barrier()  # every rank done before the group is torn down (gloo aborts otherwise)
        return out
    finally:
        if dist.mesh is not None:
            torch.distributed.destroy_process_group()
