"""Training a LLaMa, one piece per concept, as ``ropelite.trainer`` (train.py's trainer), the ablation's finetunes
and ``benchmarks/bench_train.py`` use them.

- The learning-rate schedule, a new model's initialisation, and one optimizer step's gradient accumulation (bf16
  autocast over fp32 weights, the chunked loss or one passed in), its clipping and the held-out NLL.
- RNG state and peak memory, for bit-identical resume and the metrics log.
- Checkpoints, sharded: each process writes and reads its own part of the weights and AdamW moments with
  torch.distributed.checkpoint (no process ever holds the whole state; a checkpoint reads back on any number of
  processes), in a folder written under a temporary name and renamed into place, so ``out/checkpoint`` is
  always a complete step (shards, data position, RNG, flags, config.json); the ``trained`` record every trained
  model folder carries in its config.json.
- The Hugging Face export (model.safetensors + config.json), gathered and written one tensor at a time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import RopeliteError
from .io import atomic_path, write_json
from .hf import config_to_hf, hf_name, shard_groups, shard_names, write_shard_index
from .model import Llama, LlamaConfig

CHECKPOINT = "checkpoint"          # out/checkpoint: the last complete step
_CHECKPOINT_TMP = ".checkpoint.tmp"
_CHECKPOINT_OLD = ".checkpoint.old"  # the previous step, only between two renames
TRAINER_STATE = "trainer_state.pt"   # step, data position, RNG of each rank, elapsed time, flags: small
SHARD_INDEX = ".metadata"            # DCP's index of the shards (__RANK_0.distcp) of the model and AdamW moments
MAX_SHARD_BYTES = 5_000_000_000    # Hugging Face's shard size: a 7B in fp32 becomes 6 files


# --------------------------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------------------------

SCHEDULES = ("linear", "cosine", "constant")


def learning_rate(step: int, peak: float, warmup: int, total: int, schedule: str = "linear",
                  floor: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total``: the linear warmup from 0, peak * step /
    warmup over the first ``warmup`` steps (so step 0 updates with lr 0, step ``warmup`` is the first at the peak),
    then constant, linear to 0 or cosine to 0 at step ``total``, never below ``floor`` x peak after the warmup
    (a clamp: the ablation's pretraining floors its cosine at 0.1). This is transformers'
    get_linear_schedule_with_warmup / get_cosine_schedule_with_warmup, which YaRN's finetune.py uses (warmup 20,
    then linear), at floor 0."""
    if step < warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)  # 0 at the end of warmup, 1 at step `total`
    if schedule == "linear":
        lr = peak * (1 - progress)
    else:
        lr = peak * 0.5 * (1 + math.cos(math.pi * progress))
    return max(lr, peak * floor)


def random_model(config: LlamaConfig, seed: int) -> Llama:
    """A freshly initialised model: every matrix N(0, 0.02) (GPT-2/LLaMa practice), norms 1."""
    torch.manual_seed(seed)
    model = Llama(config)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
    return model


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 compute over fp32 weights (mixed precision). The weight-cast cache is off: with gradient
    checkpointing it would keep a bf16 copy of every weight alive for the whole forward."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (model, *micro_batch) -> (loss, NLL), both sums


def next_token_nll(model: Llama, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain loss of (m, len) token ids: (summed next-token NLL to minimise, the same to report)."""
    nll, _ = model.nll(ids)
    return nll, nll


def accumulate_gradients(model: Llama, micro_batches: list[tuple[torch.Tensor, ...]], n_predicted: int,
                         dtype: torch.dtype = torch.float32, scale: float = 1.0,
                         progress: Callable[[int], None] | None = None,
                         loss_fn: LossFn = next_token_nll) -> torch.Tensor:
    """Forward and backward of each micro-batch, a tuple of tensors whose first is the (m, len) token ids, with the
    loss ``loss_fn(model, *micro_batch)[0]`` / n_predicted * scale: ``loss_fn`` returns sums over the micro-batch's
    targets, so the accumulated gradients are those of the loss summed over the whole optimizer step and divided
    by its ``n_predicted`` next-token targets (``scale`` = the number of FSDP ranks, whose gradient average
    divides by it). The default loss is the plain NLL, chunked (``model.nll``: no (len, vocab) logits tensor
    exists). Returns this process's summed NLL, ``loss_fn``'s second value (float64, detached).
    ``progress(tokens)`` is called after each micro-batch's backward, for a bar."""
    total = torch.zeros((), dtype=torch.float64, device=micro_batches[0][0].device)
    for batch in micro_batches:
        ids = batch[0]
        with autocast(ids.device, dtype):
            loss, nll = loss_fn(model, *batch)
        (loss * (scale / n_predicted)).backward()
        total += nll.detach().double()
        if progress is not None:
            progress(ids.numel())
    return total


@torch.no_grad()
def evaluate_nll(model: Llama, batches: list[torch.Tensor], dtype: torch.dtype = torch.float32,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Next-token NLL summed over each of the (m, len) batches (float64, shape (len(batches),)), in eval mode, the
    training mode restored after; per batch, so that a held-out loss can carry an interval over its sequences.
    ``progress(tokens)`` after each batch."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(batches), dtype=torch.float64, device=batches[0].device)
    for i, ids in enumerate(batches):
        with autocast(ids.device, dtype):
            sums[i] = model.nll(ids)[0].double()
        if progress is not None:
            progress(ids.numel())
    model.train(was_training)
    return sums


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (0 = do not clip) and return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the peak of allocated tensor memory. CPU: the process's peak resident set (ru_maxrss, KiB on Linux),
    which includes Python and torch themselves."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: sharded, each process writing and reading its own part
# --------------------------------------------------------------------------------------------------------------

def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This process's part of the model and optimizer state, keyed by parameter name, as torch.distributed.checkpoint
    (DCP) saves and loads it: FSDP2's DTensor shards under torchrun, whole tensors in one process. An optimizer
    that has not stepped yet gets its state made by ``get_state_dict`` (one step of zero gradients at lr 0, which
    leaves the weights as they are), so that a checkpoint has something to load into."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


@contextlib.contextmanager
def _one_process_ok():
    """DCP warns whenever no process group exists; one process writing the same format is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def write_shards(state: dict, folder: Path) -> None:
    """``checkpoint_state`` into ``folder``, a collective under torchrun: each process writes its own shards
    (``__RANK_0.distcp``), then the first process writes the index of them all (``.metadata``), only once every
    process's files are written; so ``.metadata`` present means the shards are complete."""
    import torch.distributed.checkpoint as dcp
    with _one_process_ok():
        dcp.save(state, checkpoint_id=folder)


def read_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Put a checkpoint's model and optimizer state into ``model`` and ``optimizer``: each process reads the part
    of every tensor that its shards hold, whatever number of processes wrote them (DCP reshards by name and
    offset). Strict: a tensor missing in the checkpoint, or one there that the model lacks, is an error naming it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    state = checkpoint_state(model, optimizer)
    try:
        saved = {k.removeprefix("model.") for k in dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
                 if k.startswith("model.")}
        if saved == set(state["model"]):
            with _one_process_ok():
                dcp.load(state, checkpoint_id=folder)
    except (dcp.api.CheckpointException, OSError, RuntimeError, ValueError) as e:
        # DCP's exception (a BaseException) holds each rank's (exception, traceback): say the first
        cause = next(iter(e._failures.values()))[0] if isinstance(e, dcp.api.CheckpointException) else e
        raise RopeliteError(f"cannot read the checkpoint {folder}: {_reason(cause)} (truncated or corrupt?)") from None
    mismatched = sorted(saved ^ set(state["model"]))
    if mismatched:
        key = mismatched[0]
        raise RopeliteError(f"{folder}: {'unexpected' if key in saved else 'missing'} tensor {key}")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def fresh_checkpoint_folder(out: Path, clear: bool = True) -> Path:
    """The folder a new checkpoint is written into; ``clear`` (one process does it) empties it of the remains of a
    save cut short."""
    tmp = out / _CHECKPOINT_TMP
    if clear:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    return tmp


def commit_checkpoint(out: Path, trainer_state: dict, config: dict) -> Path:
    """Complete the checkpoint whose shards ``write_shards`` put in ``fresh_checkpoint_folder(out)``: its
    ``trainer_state.pt`` (step, data position, RNG, flags; with a readable ``trainer_state.json`` summary) and the
    model's config.json, then the folder renamed to ``out/checkpoint``; the previous checkpoint is removed only
    after that rename, so a save cut anywhere leaves one complete checkpoint (``latest_checkpoint``)."""
    tmp, final, old = out / _CHECKPOINT_TMP, out / CHECKPOINT, out / _CHECKPOINT_OLD
    torch.save(trainer_state, tmp / TRAINER_STATE)
    write_json(tmp / "trainer_state.json", {k: v for k, v in trainer_state.items() if k != "rng"})
    write_json(tmp / "config.json", config)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)  # the commit point: from here on `final` is the new step
    shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """``out/checkpoint``, or the previous one when a save was cut between its two renames; None if neither."""
    for candidate in (out / CHECKPOINT, out / _CHECKPOINT_OLD):
        if all((candidate / name).is_file() for name in (TRAINER_STATE, SHARD_INDEX, "config.json")):
            return candidate
    return None


def load_trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's ``trainer_state.pt``: small, every process reads it."""
    try:
        return torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise RopeliteError(f"cannot read {checkpoint / TRAINER_STATE}: {_reason(e)}") from None


def _reason(error: BaseException) -> str:
    """An exception's first line, or its type's name when it says nothing (an EOFError of a truncated file)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def trained_record(config: LlamaConfig, *, length: int, sequences_per_step: int, step: int, steps: int, lr: float,
                   warmup: int, schedule: str, min_lr_ratio: float, init: str, model: str | None,
                   data: dict) -> dict:
    """config.json's ``ropelite`` record of a trained model: its RoPE (``config_to_hf``) and, under ``trained``,
    how it was trained, the same keys whoever trained it (train.py, the ablation): ``len``, the length it was
    trained at (``hf.trained_length`` reads it); ``step`` of ``steps`` optimizer steps of ``sequences_per_step``
    sequences = ``batch_tokens`` tokens; the ``tokens`` of those ``step`` steps; the learning rate's peak, warmup,
    schedule and floor (``learning_rate``); ``init``, 'pretrained' (from ``model``) or 'random'; and the
    ``data``, as its trainer describes it."""
    batch_tokens = sequences_per_step * length
    return {**config_to_hf(config)["ropelite"],
            "trained": {"len": length, "step": step, "steps": steps, "sequences_per_step": sequences_per_step,
                        "batch_tokens": batch_tokens, "tokens": step * batch_tokens, "lr": lr, "warmup": warmup,
                        "schedule": schedule, "min_lr_ratio": min_lr_ratio, "init": init, "model": model,
                        "data": data}}


# --------------------------------------------------------------------------------------------------------------
# The Hugging Face export, streamed one tensor at a time
# --------------------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def safetensors_header(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    """The head of a safetensors file whose tensors (name, dtype, shape) follow it in this order, each one's bytes
    right after the previous one's: the length of the JSON header (8 bytes, little-endian), then the header
    {name: {dtype, shape, data_offsets [begin, end) in the data}}, padded with spaces to a multiple of 8 bytes
    (the format's alignment). Written first, it lets a file's tensors be appended one at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in tensors:
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def export_model(model: nn.Module, config: LlamaConfig, out: Path, extra_config: dict, write: bool = True,
                 max_shard_bytes: int | None = MAX_SHARD_BYTES) -> None:
    """``out``'s model.safetensors (Hugging Face's shards and index past ``max_shard_bytes``) in fp32 and its
    config.json, as ropelite and transformers load them, gathered one tensor at a time: under FSDP2 every process
    all-gathers each weight in turn (``full_tensor``, a collective) and the writing one (``write``) appends its
    bytes to the file under the header written first (``safetensors_header``), so host memory holds one tensor,
    never the model. Each file is written under a temporary name and renamed into place; config.json last.
    Tied embeddings are stored once, as transformers does."""
    tied = config.tie_word_embeddings
    weights = [(hf_name(k), v) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")]
    groups = shard_groups([v.numel() * 4 for _, v in weights], max_shard_bytes)
    for name, group in zip(shard_names(len(groups)), groups):
        with atomic_path(out / name) if write else contextlib.nullcontext() as tmp, \
                open(tmp, "wb") if write else contextlib.nullcontext() as f:
            if f is not None:
                f.write(safetensors_header([(weights[i][0], torch.float32, tuple(weights[i][1].shape))
                                            for i in group]))
            for i in group:
                tensor = weights[i][1].detach()
                if hasattr(tensor, "full_tensor"):  # a DTensor shard: every process takes part
                    tensor = tensor.full_tensor()
                if f is not None:  # its bytes, as the header says: fp32, row-major
                    f.write(tensor.to("cpu", torch.float32).contiguous().view(-1).view(torch.uint8).numpy())
                del tensor
    if not write:
        return
    write_shard_index(out, [name for name, _ in weights], groups, sum(v.numel() * 4 for _, v in weights))
    write_json(out / "config.json", {**config_to_hf(config), "torch_dtype": "float32", **extra_config})
