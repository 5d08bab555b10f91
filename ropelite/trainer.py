"""The trainer behind train.py: token-matched long-context finetuning (or training from scratch) of a LLaMa with
a RoPE extension, in one process or sharded with FSDP2 under torchrun. train.py is its command line; ``train``
here is what a program calls with train.py's flags (``train.py --help`` explains each).

- Processes: ``Dist`` (rank, world, device, mesh) and ``setup_distributed``.
- The run, decided before its first weight exists (``prepare`` -> ``TrainingRun``): --out locked and checked,
  a resumed run's flags taken from its checkpoint, the model and its RoPE chosen, the token budget in steps,
  the packed training stream and the held-out sequences.
- The model (``build_model``), its checkpoints (``save``, ``restore``: bit-identical resume) and its held-out
  loss (``evaluate``).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .cli import DTYPES, check, token_bar, torch_device
from .data import PackedSequences, load_documents, pack_documents
from .errors import RopeliteError
from .hf import load_model, model_from_state, read_config
from .io import append_jsonl, lock_out, truncate_jsonl, write_json
from .model import Llama, LlamaConfig
from .parallel import compile_blocks, lean_weights, make_optimizer, set_learning_rate, shard, sync_on_last_micro_batch
from .rope import VARIANTS, RopeConfig
from .tokenizer import ByteTokenizer, first_id, load_tokenizer
from .training import (OPTIMIZER_STATE, LossFn, accumulate_gradients, clip_gradients, evaluate_nll,
                       latest_checkpoint, learning_rate, load_trainer_state, next_token_nll, peak_memory_mb,
                       random_model, rng_state, save_checkpoint, set_rng_state, trained_record)

# A resumed run must be the same run: --resume takes every flag from the checkpoint but these of the invocation
# itself, and those that do not change the numbers the run computes, which may be given anew (--micro-batch
# regroups the same sum: equal up to float rounding; --keep-attention saves what it would recompute; --compile
# runs the same blocks compiled). Any other flag given must equal the checkpoint's.
PER_INVOCATION = {"resume", "out", "stop_after", "quiet", "device"}
MAY_CHANGE = {"save_every", "eval_every", "micro_batch", "epochs_ok", "compile", "keep_attention"}
DAY_S = 86400  # a run estimated longer than this on this device gets a notice up front
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


# --------------------------------------------------------------------------------------------------------------
# The flags: checked, and on --resume the checkpoint's
# --------------------------------------------------------------------------------------------------------------

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


def prepare(args, given: set[str], dist: Dist) -> TrainingRun:
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
    if dist.main and not args.resume:
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
    """The weights to start from, fp32 on ``where``: the checkpoint's, the pretrained ones, or new ones."""
    if run.checkpoint:
        return load_model(run.checkpoint, dtype=torch.float32, device=where)
    if run.source is not None:
        return load_model(run.source, dtype=torch.float32, device=where, **run.overrides)
    return random_model(run.config, run.args.seed).to(where)


def build_model(run: TrainingRun, dist: Dist) -> Llama:
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


def restore(run: TrainingRun, model: Llama, optimizer, dist: Dist) -> int:
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


def save(run: TrainingRun, model: Llama, optimizer, step: int, dist: Dist) -> None:
    """out/checkpoint at ``step`` (model, optimizer, data position, RNG), and the model published in out."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)  # collectives: every rank calls them
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.main:
        save_checkpoint(run.out, model_from_state(run.config, model_state),
                        {"step": step, "sequences": step * run.per_step, "tokens": step * run.step_tokens,
                         "rng": rng_state(dist.device), "args": vars(run.args)},
                        optim_state, extra_config={"ropelite": run.trained_record(step)})
    dist.barrier()


def evaluate(run: TrainingRun, model: Llama, step: int, dist: Dist) -> None:
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
# One optimizer step, and the loop around it
# --------------------------------------------------------------------------------------------------------------

class NonFiniteLoss(RopeliteError):
    """A step's loss or gradient norm is inf or NaN: raised before the weights change."""

    def __init__(self, loss: float, norm: float):
        super().__init__(f"loss {loss} (gradient norm {norm}): stopped before updating the weights")


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[tuple[torch.Tensor, ...]],
                   lr: float, n_predicted: int, loss_fn: LossFn = next_token_nll, dtype: torch.dtype = torch.float32,
                   clip: float = 1.0, world: int = 1,
                   progress: Callable[[int], None] | None = None) -> tuple[float, float]:
    """One update of ``model`` from this process's micro-batches of an optimizer step: the learning rate set to
    ``lr``; the gradients of ``loss_fn`` (default the plain next-token NLL; the ablation passes its weighted one)
    accumulated, divided by the step's ``n_predicted`` targets of all ``world`` processes
    (``accumulate_gradients``; under FSDP2 reduced once, after the last micro-batch); the global gradient norm
    clipped to ``clip`` (0 = off); ``optimizer``'s update (AdamW in train.py and the ablation). Returns (the
    step's mean NLL over all processes in nats/token, the gradient norm before clipping); ``progress(tokens)``
    after each micro-batch. A non-finite loss or norm raises NonFiniteLoss here, before the weights change."""
    set_learning_rate(optimizer, lr)
    with sync_on_last_micro_batch(model, len(micro_batches)):  # FSDP: one reduce-scatter per step
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


class Progress:
    """The run's bar in tokens of all ranks, moved after every micro-batch so that its rate and ETA come with the
    first one, and a notice then when the rest of the run would take more than a day on this device."""

    def __init__(self, run: TrainingRun, start: int, dist: Dist):
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


def fit(run: TrainingRun, model: Llama, optimizer, start: int, dist: Dist) -> int:
    """Steps ``start`` .. until the run ends, --stop-after or a first SIGINT/SIGTERM: one metrics.jsonl row
    each, held-out evaluation every --eval-every steps and checkpoints every --save-every, both at the end too.
    Returns the last step; a signal ends with a checkpoint and SystemExit(128 + signal) instead."""
    args, device = run.args, dist.device
    progress = Progress(run, start, dist)
    began, done, signum = time.perf_counter(), start, 0
    try:
        with StopSignal() as stopper:
            for step in range(start, run.steps):
                tick, lr = time.perf_counter(), run.learning_rate(step)
                try:
                    loss, norm = optimizer_step(model, optimizer, run.micro_batches(step, dist), lr, run.n_predicted,
                                                dtype=run.dtype, clip=args.clip, world=dist.world,
                                                progress=progress.micro_batch)
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


def train_process(args: argparse.Namespace, dist: Dist, given: set[str] = frozenset()) -> Path:
    """This process's part of ``train``: prepare, build (or restore) the model, then fit."""
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


def train(args: argparse.Namespace, given: set[str] = frozenset()) -> Path:
    """Train as train.py's flags ``args`` say (``train.py --help`` explains each), in this process or, under
    torchrun, in each of its processes; returns --out. ``given``: the flags written on the command line; on
    --resume the others are taken from the checkpoint."""
    dist = setup_distributed(args.device)
    try:
        out = train_process(args, dist, given)
        dist.barrier()  # every rank done before the group is torn down (gloo aborts otherwise)
        return out
    finally:
        if dist.mesh is not None:
            torch.distributed.destroy_process_group()
