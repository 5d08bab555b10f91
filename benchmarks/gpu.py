"""Every GPU figure of the README in one run (at most 8 minutes on one H100/H200), beside the memory estimate.

    python benchmarks/gpu.py                # on a CUDA machine: benchmarks/results/gpu-<device>.json and .md
    python benchmarks/gpu.py --dry-run      # the same code at toy sizes on CPU (~1 minute; the test suite runs it)

What is measured (random weights: speed and memory do not depend on the values; shapes from ropelite.presets):
- the environment (GPU, its memory, torch and CUDA versions) and the attention kernel chosen per dtype
  (ropelite.model.choose_kernel), each tried once on a SmolLM2-shaped attention at 4K;
- a training step as train.py runs it on one GPU (bf16 autocast over fp32 master weights, gradient checkpointing,
  the chunked loss, fused AdamW, clipping): tokens/s, MFU and peak memory (max_memory_allocated) for SmolLM2 at
  8K and 32K, and for LLaMa-2-7B at 4K and 32K. The 7B is measured with 2 and 4 blocks; a block's time and memory
  are the difference, and the 32-block figures are extrapolated from them (marked "scaled to 32 layers"). The
  7B at 32K also in train.py --lean (needs torchao). The same step in transformers (LlamaForCausalLM, sdpa,
  checkpointing, full logits) where it is installed: the ratio of our tokens/s to its;
- evaluation: forward tokens/s and peak memory of the chunked loss (bf16 weights, no gradients) at 32K and 128K
  (SmolLM2), and needle-style greedy decoding after a 64K prompt with each step's attention entropy observed;
- the estimate of benchmarks/memory_estimate.py beside every measured peak.

MFU = model FLOPs per second / the GPU's dense bf16 peak (H100 SXM and H200 989 TFLOP/s, H100 PCIe 756, A100
312; unknown GPUs: none). Model FLOPs per trained token (recomputation of checkpointing not counted):
    6 * N + 6 * n_layers * n_heads * head_dim * len
N = the parameters that multiply (all but the embedding table; lm_head counted even when tied); the second term is
causal attention: q k^T and p v are 2 * n_heads * head_dim FLOPs per key each, a query sees len / 2 keys on
average, and backward costs twice the forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import has_transformers  # noqa: E402
from memory_estimate import GIB, estimate, eval_estimate, param_count  # noqa: E402
from ropelite.cli import ArgumentParser, run_script  # noqa: E402
from ropelite.errors import RopeliteError  # noqa: E402
from ropelite.hf import config_to_hf  # noqa: E402
from ropelite.io import atomic_path, write_json  # noqa: E402
from ropelite.model import Attention, LlamaConfig, attention_kernel_note, choose_kernel, generate  # noqa: E402
from ropelite.parallel import lean_weights, make_optimizer  # noqa: E402
from ropelite.presets import preset  # noqa: E402
from ropelite.stats import entropy  # noqa: E402
from ropelite.trainer import optimizer_step  # noqa: E402
from ropelite.training import autocast, random_model  # noqa: E402

PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}  # dense, per GPU
SCALED_LAYERS = (2, 4)  # the 7B is measured with these many blocks and extrapolated to its 32
DRY_LAYERS = {"SmolLM2-135M": 2, "LLaMa-2-7B": 8}  # the toy 7B is deeper than SCALED_LAYERS, as the real one
# train: (preset, len, lean, scaled: measured at SCALED_LAYERS blocks and extrapolated to all)
FULL = {"train": [("SmolLM2-135M", 8192, False, False), ("SmolLM2-135M", 32768, False, False),
                  ("LLaMa-2-7B", 4096, False, True), ("LLaMa-2-7B", 32768, False, True),
                  ("LLaMa-2-7B", 32768, True, True)],
        "eval": [("SmolLM2-135M", 32768), ("SmolLM2-135M", 131072)], "needle": ("SmolLM2-135M", 65536, 32),
        "kernel_len": 4096, "steps": 3}
DRY = {"train": [("SmolLM2-135M", 64, False, False), ("SmolLM2-135M", 128, False, False),
                 ("LLaMa-2-7B", 64, False, True), ("LLaMa-2-7B", 128, False, True)],  # lean: torchao compiles slowly on CPU
       "eval": [("SmolLM2-135M", 128), ("SmolLM2-135M", 256)], "needle": ("SmolLM2-135M", 256, 4),
       "kernel_len": 64, "steps": 1}


# --------------------------------------------------------------------------------------------------------------
# Shapes, FLOPs, timing
# --------------------------------------------------------------------------------------------------------------

def shape(name: str, dry: bool, layers: int | None = None) -> LlamaConfig:
    """The preset's config with ``layers`` blocks; at toy size for a dry run (GQA kept: 3 query heads per key
    head for SmolLM2, none for the 7B)."""
    c = preset(name)
    if dry:
        heads, kv = (6, 2) if c.num_attention_heads != c.num_key_value_heads else (4, 4)
        c = dataclasses.replace(c, vocab_size=256, hidden_size=16 * heads, intermediate_size=64 * heads,
                                num_attention_heads=heads, num_key_value_heads=kv, head_dim=16,
                                num_hidden_layers=DRY_LAYERS[name])
    return dataclasses.replace(c, num_hidden_layers=layers or c.num_hidden_layers)


def train_flops_per_token(c: LlamaConfig, length: int) -> float:
    """6 N + 6 n_layers n_heads head_dim len (the module docstring derives it)."""
    # param_count holds a tied matrix once: as lm_head it multiplies; an untied embedding table is only read
    multiplying = param_count(c) - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
    return 6 * multiplying + 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * length


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def measure(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """(median seconds of ``repeats`` calls after one warm-up call, peak allocated GiB over them; None on CPU)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - tick)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(what: str, fn) -> dict:
    """fn()'s row, or the row of its failure (an out-of-memory is a result too), so one case cannot stop the run."""
    try:
        return fn()
    except (RuntimeError, RopeliteError) as e:  # torch.OutOfMemoryError is a RuntimeError
        return {"error": f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}


# --------------------------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_GiB=round(props.total_memory / GIB, 1),
                   peak_bf16_tflops=(peak_flops(device) or 0) / 1e12 or None)
    return env


def kernels(device: torch.device, dry: bool, length: int) -> list[dict]:
    """The kernel choice per dtype for SmolLM2's attention (GQA 9/3), each run once at ``length`` tokens."""
    c = shape("SmolLM2-135M", dry)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        def attend():
            q = torch.randn(1, c.num_attention_heads, length, c.head_dim, device=device, dtype=dtype)
            k = torch.randn(1, c.num_key_value_heads, length, c.head_dim, device=device, dtype=dtype)
            seconds, peak = measure(lambda: Attention._sdpa(q, k, k, torch.arange(length, device=device)), device, 1)
            return {"ran": True, "seconds": seconds, "peak_GiB": peak}
        rows.append({"dtype": str(dtype).removeprefix("torch."), "len": length,
                     "choice": attention_kernel_note(c, device, dtype),
                     "backends": [b.name for b in choose_kernel(device.type, dtype, c.num_attention_heads,
                                                                c.num_key_value_heads, True).backends or ()],
                     **guarded("attention", attend)})
    return rows


def ropelite_step(c: LlamaConfig, length: int, device: torch.device, lean: bool):
    """train.py's step on one GPU for one (1, length) sequence: returns the step as a function."""
    with torch.device(device):
        model = random_model(c, seed=0)
    model.gradient_checkpointing = True
    model.train()
    if lean:
        model = lean_weights(model, world=1)
    optimizer = make_optimizer(model, 1e-5, (0.9, 0.999), 0.01, device, lean=lean)
    ids = torch.randint(0, c.vocab_size, (1, length), device=device)

    def step():
        optimizer_step(model, optimizer, [(ids,)], 1e-5, length - 1, dtype=torch.bfloat16, clip=1.0)
    return step


def transformers_step(c: LlamaConfig, length: int, device: torch.device):
    """The same step in transformers: LlamaForCausalLM with sdpa attention, checkpointing, its full-logits loss."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    hf = {k: v for k, v in config_to_hf(c).items() if k != "ropelite"}
    with torch.device(device):
        model = LlamaForCausalLM(HFConfig(**hf, attn_implementation="sdpa"))
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True if device.type == "cuda" else None)
    ids = torch.randint(0, c.vocab_size, (1, length), device=device)

    def step():
        with autocast(device, torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def step_figures(make_step, c: LlamaConfig, length: int, device: torch.device, repeats: int) -> dict:
    step = make_step(c, length, device)
    seconds, peak = measure(step, device, repeats)
    del step
    release(device)
    return {"seconds": seconds, "peak_GiB": peak}


def train_case(name: str, length: int, lean: bool, scaled: bool, device: torch.device, dry: bool, repeats: int,
               compare: bool) -> dict:
    """One training row: measured at the full depth, or at SCALED_LAYERS blocks and extrapolated to all."""
    full = shape(name, dry)
    depths = SCALED_LAYERS if scaled else (full.num_hidden_layers,)
    ours = [step_figures(lambda c, n, d: ropelite_step(c, n, d, lean), shape(name, dry, k), length, device, repeats)
            for k in depths]
    row = {"model": name + (" (toy)" if dry else ""), "len": length, "mode": "lean" if lean else "bf16",
           "layers_measured": list(depths), "layers": full.num_hidden_layers,
           "scaled": f"scaled to {full.num_hidden_layers} layers" if scaled else ""}
    seconds, peak = extrapolate(ours, depths, full.num_hidden_layers)
    flops = train_flops_per_token(full, length) * length
    row.update(tokens_per_s=length / seconds, step_s=seconds, peak_GiB=peak,
               mfu=(flops / seconds / peak_flops(device)) if peak_flops(device) else None,
               estimate_GiB=estimate(full, length, lean=lean)["total"] / GIB)
    if compare and not lean:
        theirs = [step_figures(transformers_step, shape(name, dry, k), length, device, repeats) for k in depths]
        their_seconds, their_peak = extrapolate(theirs, depths, full.num_hidden_layers)
        row.update(transformers_tokens_per_s=length / their_seconds, transformers_peak_GiB=their_peak,
                   speed_ratio_vs_transformers=their_seconds / seconds)
    return row


def extrapolate(figures: list[dict], depths, layers: int) -> tuple[float, float | None]:
    """Seconds and peak GiB at ``layers`` blocks, linear in the depth through the two measured ones (or the one
    measured at full depth). A block cannot cost less than nothing: when noise makes the deeper measurement the
    cheaper one, each block is charged the deeper run's whole cost per block (b / kb), an overestimate."""
    if len(figures) == 1:
        return figures[0]["seconds"], figures[0]["peak_GiB"]
    (a, b), (ka, kb) = figures, depths

    def at(key):
        if a[key] is None:
            return None
        per_block = (b[key] - a[key]) / (kb - ka)
        return b[key] + (per_block if per_block > 0 else b[key] / kb) * (layers - kb)
    return at("seconds"), at("peak_GiB")


def eval_case(name: str, length: int, device: torch.device, dry: bool, repeats: int) -> dict:
    """Forward of the chunked loss with bf16 weights and no gradients, as eval_ppl.py runs it on CUDA."""
    c = shape(name, dry)
    with torch.device(device):
        model = random_model(c, seed=0).to(torch.bfloat16).eval()
    ids = torch.randint(0, c.vocab_size, (1, length), device=device)
    with torch.no_grad():
        seconds, peak = measure(lambda: model.nll(ids), device, repeats)
    del model
    release(device)
    return {"model": name + (" (toy)" if dry else ""), "len": length, "tokens_per_s": length / seconds,
            "seconds": seconds, "peak_GiB": peak, "estimate_GiB": eval_estimate(c, length)["total"] / GIB}


def needle_case(name: str, length: int, new_tokens: int, device: torch.device, dry: bool) -> dict:
    """Greedy decoding after a ``length``-token prompt with every step's attention entropy taken (needle.py's
    loop): decoding tokens/s = (new_tokens - 1) / (time of generate - time of its prefill alone)."""
    c = shape(name, dry)
    with torch.device(device):
        model = random_model(c, seed=0).to(torch.bfloat16).eval()
    ids = torch.randint(0, c.vocab_size, (1, length), device=device)
    entropies = []

    def observe(layer, positions, probs):
        entropies.append(float(entropy(probs).mean()))

    last = torch.tensor([length - 1])
    with torch.no_grad():
        prefill, _ = measure(lambda: model(ids, cache=model.new_cache(), on_attention=observe, attention_rows=last,
                                           last_only=True), device, 1)
        whole, peak = measure(lambda: generate(model, ids, new_tokens, on_attention=observe), device, 1)
    del model
    release(device)
    return {"model": name + (" (toy)" if dry else ""), "prompt_len": length, "new_tokens": new_tokens,
            "prefill_s": prefill, "decode_tokens_per_s": (new_tokens - 1) / max(whole - prefill, 1e-9),
            "peak_GiB": peak, "mean_entropy_nats": sum(entropies) / len(entropies)}


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------

def fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row.get('model', '')} | error: {row['error']} |")
        else:
            lines.append("| " + " | ".join(fmt(row.get(k)) for k in columns) + " |")
    return lines


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# GPU benchmark: {env.get('gpu', env['device'])}", "", result["note"], "",
             "`" + result["command"] + "`; " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "## Attention kernel per dtype (SmolLM2 shape)", ""]
    lines += table(result["kernels"], ["dtype", "choice", "ran", "peak_GiB"])
    lines += ["", "## Training step (bf16, checkpointing, chunked loss; one sequence)", "", result["flops"], ""]
    lines += table(result["train"], ["model", "len", "mode", "scaled", "tokens_per_s", "mfu", "peak_GiB",
                                     "estimate_GiB", "speed_ratio_vs_transformers", "transformers_peak_GiB"])
    lines += ["", "## Evaluation: chunked-loss forward (bf16 weights)", ""]
    lines += table(result["eval"], ["model", "len", "tokens_per_s", "peak_GiB", "estimate_GiB"])
    lines += ["", "## Needle decoding with attention entropy", ""]
    lines += table([result["needle"]], ["model", "prompt_len", "new_tokens", "prefill_s", "decode_tokens_per_s",
                                        "peak_GiB", "mean_entropy_nats"])
    return "\n".join(lines) + "\n"


def device_slug(device: torch.device, dry: bool) -> str:
    if dry:
        return "dry-run-" + device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def main(argv=None) -> Path:
    p = ArgumentParser(prog="gpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="toy sizes on CPU (or --device), the same code: checks the script, measures nothing")
    p.add_argument("--device", default=None, help="torch device (default: cuda; cpu with --dry-run)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="folder for gpu-<device>.json and .md (default benchmarks/results)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RopeliteError("no CUDA device here: run on a GPU machine, or pass --dry-run")
    plan = DRY if args.dry_run else FULL
    compare = has_transformers() and not args.no_transformers
    began = time.perf_counter()
    result = {"note": ("DRY RUN at toy sizes: these figures say nothing about any GPU" if args.dry_run else
                       "Measured on this GPU in one run; estimates are benchmarks/memory_estimate.py's, computed."),
              "command": "python benchmarks/gpu.py" + (" --dry-run" if args.dry_run else ""),
              "environment": environment(device), "flops": "model FLOPs per token = 6 N + 6 n_layers n_heads "
              "head_dim len (N: multiplying parameters; causal attention; recomputation not counted)"}

    def say(what):
        print(f"[{time.perf_counter() - began:6.1f} s] {what}", file=sys.stderr, flush=True)
    say("attention kernels")
    result["kernels"] = kernels(device, args.dry_run, plan["kernel_len"])
    result["train"] = []
    for name, length, lean, scaled in plan["train"]:
        say(f"train {name} {length}{' lean' if lean else ''}")
        result["train"].append({"model": name, **guarded(f"train {name} {length}",
                                lambda: train_case(name, length, lean, scaled, device, args.dry_run, plan["steps"],
                                                   compare))})
    result["eval"] = []
    for name, length in plan["eval"]:
        say(f"eval {name} {length}")
        result["eval"].append({"model": name, **guarded(f"eval {name} {length}",
                               lambda: eval_case(name, length, device, args.dry_run, plan["steps"]))})
    say("needle decoding")
    name, length, new = plan["needle"]
    result["needle"] = {"model": name, **guarded("needle", lambda: needle_case(name, length, new, device,
                                                                               args.dry_run))}
    result["seconds"] = time.perf_counter() - began
    out = Path(args.out) / f"gpu-{device_slug(device, args.dry_run)}"
    write_json(out.with_suffix(".json"), result)
    text = markdown(result)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    print(text)
    say(f"written: {out}.json, {out}.md")
    return out.with_suffix(".json")


if __name__ == "__main__":
    run_script(main)
