"""Training a LLaMa, one piece per concept, as ``ropelite.trainer`` (train.py's trainer), the ablation's finetunes
and ``benchmarks/bench_train.py`` use them.

- The learning-rate schedule, a new model's initialisation, and one optimizer step's gradient accumulation (bf16
  autocast over fp32 weights, the chunked loss or one passed in), its clipping and the held-out NLL.
- RNG state and peak memory, for bit-identical resume and the metrics log.
- Checkpoints: a folder written under a temporary name and renamed into place, so ``out/checkpoint`` is always
  a complete step (a loadable model folder plus the optimizer, data position and RNG); the ``trained`` record
  every trained model folder carries in its config.json.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import RopeliteError
from .io import atomic_path, write_json
from .hf import config_to_hf, save_model
from .model import Llama, LlamaConfig

CHECKPOINT = "checkpoint"          # out/checkpoint: the last complete step
_CHECKPOINT_TMP = ".checkpoint.tmp"
_CHECKPOINT_OLD = ".checkpoint.old"  # the previous step, only between two renames
TRAINER_STATE = "trainer_state.pt"   # step, data position, RNG, flags: small, every rank reads it
OPTIMIZER_STATE = "optimizer.pt"     # AdamW moments by parameter name: large, only rank 0 reads it
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
    """Summed next-token NLL (float64) of (m, len) batches in eval mode, the training mode restored after;
    ``progress(tokens)`` after each batch."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=batches[0].device)
    for ids in batches:
        with autocast(ids.device, dtype):
            total += model.nll(ids)[0].double()
        if progress is not None:
            progress(ids.numel())
    model.train(was_training)
    return total


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
# Checkpoints
# --------------------------------------------------------------------------------------------------------------

def save_checkpoint(out: Path, model: Llama, trainer_state: dict, optimizer_state: dict,
                    extra_config: dict | None = None) -> Path:
    """Write ``out/checkpoint`` = the model (safetensors + config.json, loadable by ropelite and transformers)
    + ``trainer_state.pt`` (step, data position, RNG, flags) + ``optimizer.pt``, atomically: everything goes to a
    temporary folder that is then renamed into place; the previous checkpoint is removed only after that rename.
    Then the weights and config are published in ``out`` itself (hard links, no copy)."""
    tmp, final, old = out / _CHECKPOINT_TMP, out / CHECKPOINT, out / _CHECKPOINT_OLD
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, max_shard_bytes=MAX_SHARD_BYTES, extra_config=extra_config)
    torch.save(optimizer_state, tmp / OPTIMIZER_STATE)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    summary = {k: v for k, v in trainer_state.items() if k in ("step", "sequences", "tokens", "args")}
    write_json(tmp / "trainer_state.json", summary)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)  # the commit point: from here on `final` is the new step
    shutil.rmtree(old, ignore_errors=True)
    publish(final, out)
    return final


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


def latest_checkpoint(out: Path) -> Path | None:
    """``out/checkpoint``, or the previous one when a save was cut between its two renames; None if neither."""
    for candidate in (out / CHECKPOINT, out / _CHECKPOINT_OLD):
        if all((candidate / name).is_file() for name in (TRAINER_STATE, OPTIMIZER_STATE, "config.json")):
            return candidate
    return None


def load_trainer_state(checkpoint: Path, name: str = TRAINER_STATE) -> dict:
    """``trainer_state.pt`` of a checkpoint, or with ``name=OPTIMIZER_STATE`` its optimizer state."""
    try:
        return torch.load(checkpoint / name, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise RopeliteError(f"cannot read {checkpoint / name}: {str(e).splitlines()[0]}") from None


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.name.startswith("model") and (p.suffix == ".safetensors" or p.name.endswith(".index.json")))


def publish(checkpoint: Path, out: Path) -> None:
    """Make ``out`` itself the checkpoint's model folder: each weight file, then config.json, is linked (copied
    where links are not possible) under a temporary name and renamed over the old one; stale shards go last."""
    new = _model_files(checkpoint)
    for src in [*new, checkpoint / "config.json"]:
        with atomic_path(out / src.name) as tmp:
            tmp.unlink()
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
    for stale in set(p.name for p in _model_files(out)) - set(p.name for p in new):
        (out / stale).unlink()
