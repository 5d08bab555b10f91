"""Every GPU figure of docs/results.md in one run (at most 8 minutes on one H100/H200), beside the memory estimate.

    python benchmarks/gpu.py                # on a CUDA machine: benchmarks/results/gpu-<device>.json and .md
    python benchmarks/gpu.py --dry-run      # the same code paths at toy sizes on CPU (the test suite runs it)

The run is a list of stages (``FULL``; the dry run's ``DRY`` has the same stages at toy sizes). Its plan (each
stage's shapes, steps, expected seconds and time cap) is printed before the first stage. Each stage has a step
count and a time cap: after its warm-up call it repeats only while its cap leaves time, and a stage whose cap no
longer fits into the run's budget (``BUDGET_S``) is skipped, with a row saying so. The caps add up to less than
the budget, so the run keeps to it by construction, give or take one call that outlasts its stage's cap.
Expected seconds are a plan, not a measurement: the stage's model FLOPs at ``PLAN_MFU`` of the device's matmul
rate (the datasheet's on a known GPU, else measured first), plus stated allowances for setting up a stage and for
torchao's compilation.

What is measured (random weights: speed and memory do not depend on the values; shapes from ropelite.presets):
- the environment (GPU, its memory, torch and CUDA versions) and its measured bf16 matmul rate;
- the attention kernel that ropelite.model.choose_kernel picks ON CUDA for each dtype (fp32, fp16, bf16), for
  a prefill and a cached decoding step, with SmolLM2's and the 7B's heads, each run once through
  Attention._sdpa. On CPU the same choice runs: where it allows a kernel the CPU has (flash) it runs, and where
  it allows only the memory-efficient kernel, which the CPU lacks, the run takes the error path a CUDA run takes
  for a shape no O(L) kernel accepts: its row holds that one-line error;
- a training step as train.py runs it (bf16, gradient checkpointing, the chunked loss, clipping, the optimizer
  ropelite.parallel.make_optimizer builds for CUDA: fused AdamW, or torchao's AdamW8bit for --lean): tokens/s,
  model TFLOP/s, MFU and peak memory, for SmolLM2 at 8K and 32K, LLaMa-2-7B at 4K and 32K, the 7B at 32K with
  --lean (needs torchao), and SmolLM2 at 8K under FSDP2 on one process with two micro-batches (the gradient sync
  of the last one only, the unsharded gradients in between). The 7B is measured with 2 and 4 blocks; a block's
  time and memory are the difference, and the 32-block figures are extrapolated from them (marked "scaled to 32
  layers"). The same step in transformers (LlamaForCausalLM, sdpa, checkpointing, full logits) where it is
  installed: the ratio of our tokens/s to its;
- evaluation: forward tokens/s and peak memory of the chunked loss (bf16 weights, no gradients) at 32K and 128K
  (SmolLM2), and needle-style greedy decoding after a 64K prompt with each step's attention entropy observed;
- the estimate of benchmarks/memory_estimate.py beside every measured peak, without the CUDA context (which
  max_memory_allocated does not see either).
Peak memory: max_memory_allocated on CUDA; on CPU the live tensor peak of one more step (measure.py's
live_tensor_peak), marked so in the results. MFU = model FLOPs per second / the GPU's dense bf16 peak (H100 SXM
and H200 989 TFLOP/s, H100 PCIe 756, A100 312, by the datasheets); on CPU, or a GPU not in that table, the bf16
matmul rate measured at the start of the run instead, marked so. Model FLOPs per trained token (the recompute of
checkpointing not counted):
    6 * N + 6 * n_layers * n_heads * head_dim * len
N = the parameters that multiply (all but the embedding table; lm_head counted even when tied); the second term is
causal attention: q k^T and p v are 2 * n_heads * head_dim FLOPs per key each, a query sees len / 2 keys on
average, and backward costs twice the forward. A forward alone is a third of that.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import has_transformers, live_tensor_peak  # noqa: E402
from memory_estimate import GIB, estimate, eval_estimate, param_count  # noqa: E402
from ropelite.cli import ArgumentParser, run_script  # noqa: E402
from ropelite.errors import RopeliteError  # noqa: E402
from ropelite.hf import config_to_hf  # noqa: E402
from ropelite.io import atomic_path, write_json  # noqa: E402
from ropelite.model import Attention, LlamaConfig, choose_kernel, generate  # noqa: E402
from ropelite.parallel import LEAN_PACKAGE, lean_weights, make_optimizer, shard  # noqa: E402
from ropelite.presets import preset  # noqa: E402
from ropelite.stats import entropy  # noqa: E402
from ropelite.trainer import optimizer_step  # noqa: E402
from ropelite.training import autocast, random_model  # noqa: E402

TARGET = torch.device("cuda")  # whose code paths every run takes: the kernel choice, the optimizer
BUDGET_S = 480                 # 8 minutes
PLAN_MFU = 0.35                # planning only: the share of the matmul rate a stage is expected to reach
SETUP_S = 2                    # planning only: building a stage's models, loading its kernels on the first call
COMPILE_S = 40                 # planning only: torchao's AdamW8bit compiles its step on the first call
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}  # dense, per GPU
SCALED_LAYERS = (2, 4)         # the 7B is measured with these many blocks and extrapolated to its 32
DRY_LAYERS = {"SmolLM2-135M": 2, "LLaMa-2-7B": 8}  # the toy 7B is deeper than SCALED_LAYERS, as the real one
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Stage:
    kind: str                # "kernels", "train", "eval", "needle"
    model: str               # a preset
    len: int
    cap_s: float             # time cap of the stage
    steps: int = 3           # timed calls after the warm-up (needle: new tokens)
    mode: str = "bf16"       # train: "bf16" (one GPU, autocast), "lean" (train.py --lean), "fsdp" (FSDP2, 1 process)
    scaled: bool = False     # train: measured at SCALED_LAYERS blocks and extrapolated to all
    micro_batches: int = 1   # train: forwards per optimizer step


FULL = [Stage("kernels", "SmolLM2-135M", 4096, 15, steps=1), Stage("kernels", "LLaMa-2-7B", 4096, 15, steps=1),
        Stage("train", "SmolLM2-135M", 8192, 30), Stage("train", "SmolLM2-135M", 32768, 40),
        Stage("train", "SmolLM2-135M", 8192, 30, mode="fsdp", micro_batches=2),
        Stage("train", "LLaMa-2-7B", 4096, 40, scaled=True), Stage("train", "LLaMa-2-7B", 32768, 60, scaled=True),
        Stage("train", "LLaMa-2-7B", 32768, 90, mode="lean", scaled=True),
        Stage("eval", "SmolLM2-135M", 32768, 20), Stage("eval", "SmolLM2-135M", 131072, 40),
        Stage("needle", "SmolLM2-135M", 65536, 40, steps=32)]
DRY = [Stage("kernels", "SmolLM2-135M", 64, 5, steps=1), Stage("kernels", "LLaMa-2-7B", 64, 5, steps=1),
       Stage("train", "SmolLM2-135M", 64, 5, steps=1), Stage("train", "SmolLM2-135M", 128, 5, steps=1),
       Stage("train", "SmolLM2-135M", 64, 5, steps=1, mode="fsdp", micro_batches=2),
       Stage("train", "LLaMa-2-7B", 64, 5, steps=1, scaled=True),
       Stage("train", "LLaMa-2-7B", 128, 5, steps=1, scaled=True),
       Stage("train", "LLaMa-2-7B", 128, 40, steps=1, mode="lean", scaled=True),
       Stage("eval", "SmolLM2-135M", 128, 5, steps=1), Stage("eval", "SmolLM2-135M", 256, 5, steps=1),
       Stage("needle", "SmolLM2-135M", 256, 5, steps=4)]


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


def stage_flops(stage: Stage, dry: bool) -> float:
    """Model FLOPs of a stage's calls (its warm-up included), for its plan. Training: the measured depths; with
    checkpointing each block's forward runs twice (4/3 of the step); the transformers step (bf16 mode) as much
    again."""
    c = shape(stage.model, dry)
    if stage.kind == "kernels":  # 3 dtypes x (prefill + a cached step), a causal prefill's q k^T and p v
        return 6 * 2 * 2 * c.num_attention_heads * c.head_dim * stage.len ** 2
    if stage.kind == "train":
        depths = SCALED_LAYERS if stage.scaled else (c.num_hidden_layers,)
        per_call = sum(train_flops_per_token(shape(stage.model, dry, k), stage.len) for k in depths) * stage.len
        return (2 if stage.mode == "bf16" else 1) * (stage.steps + 1) * per_call * stage.micro_batches * 4 / 3
    forward = train_flops_per_token(c, stage.len) / 3 * stage.len
    return (stage.steps + 1) * forward if stage.kind == "eval" else 2 * forward  # needle: 2 prefills, short steps


def datasheet_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def matmul_rate(device: torch.device, dry: bool) -> float:
    """bf16 FLOP/s of an n x n x n matrix product on this device (median of 5 after a warm-up)."""
    n = 512 if dry else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds, _, _ = measure(lambda: a @ b, device, 5)
    return 2 * n ** 3 / seconds


def measure(fn, device: torch.device, repeats: int, deadline: float = float("inf")) -> tuple[float, int, float | None]:
    """(median seconds of up to ``repeats`` calls after one warm-up call, the calls timed, the peak allocated GiB
    over them on CUDA, else None). Calls after the first stop once ``deadline`` (perf_counter) has passed."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    while len(times) < max(1, repeats) and (not times or time.perf_counter() < deadline):
        tick = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - tick)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], len(times), peak


def has_torchao() -> bool:
    return importlib.util.find_spec(LEAN_PACKAGE) is not None


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(what: str, fn) -> dict:
    """fn()'s row, or the row of its failure (an out-of-memory is a result too), so one case cannot stop the run."""
    try:
        return fn()
    except (RuntimeError, RopeliteError) as e:  # torch.OutOfMemoryError is a RuntimeError
        return {"error": f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}


@contextlib.contextmanager
def one_process_mesh(device: torch.device):
    """A process group of this process alone (NCCL on CUDA, gloo elsewhere) and its device mesh, for FSDP2."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    with tempfile.TemporaryDirectory() as rendezvous:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                init_method=f"file://{rendezvous}/file")
        try:
            yield init_device_mesh(device.type, (1,))
        finally:
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------------------------

def environment(device: torch.device, rate: float) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda, "matmul_bf16_tflops": rate / 1e12}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_GiB=round(props.total_memory / GIB, 1),
                   peak_bf16_tflops=(datasheet_flops(device) or 0) / 1e12 or None)
    return env


def kernels(stage: Stage, device: torch.device, dry: bool, deadline: float) -> list[dict]:
    """choose_kernel's choice on CUDA per dtype for the preset's heads, for a causal prefill of ``stage.len``
    tokens and a cached step (1 query, ``stage.len`` keys, a boolean mask), each run once on ``device``."""
    c = preset(stage.model)  # the real heads and head_dim: the choice depends on them, not on the width
    H, Hkv, d, S = c.num_attention_heads, c.num_key_value_heads, c.head_dim, stage.len
    rows = []
    for dtype in DTYPES:
        for T in (S, 1):
            kernel = choose_kernel(TARGET.type, dtype, H, Hkv, causal=T == S)
            row = {"model": stage.model, "dtype": str(dtype).removeprefix("torch."),
                   "call": "prefill" if T == S else "cached step", "len": S, "heads": f"{H}/{Hkv} x {d}",
                   "choice": kernel.name, "backends": [b.name for b in kernel.backends or ()],
                   "expand_kv": kernel.expand_kv}
            if time.perf_counter() > deadline:
                rows.append({**row, "ran": "skipped: the stage's time cap"})
                continue
            q = torch.randn(1, H, T, d, device=device, dtype=dtype)
            k = torch.randn(1, Hkv, S, d, device=device, dtype=dtype)
            try:
                seconds, _, peak = measure(lambda: Attention._sdpa(q, k, k, torch.arange(S - T, S, device=device),
                                                                   kernel), device, 1)
                row.update(ran=True, seconds=seconds, peak_GiB=peak)
            except RopeliteError as e:  # the one-line error a shape without an O(L) kernel ends in
                row.update(ran=False, error_path=str(e))
            rows.append(row)
    return rows


def ropelite_step(c: LlamaConfig, length: int, device: torch.device, mode: str, micro_batches: int, mesh=None):
    """train.py's optimizer step (ropelite.trainer.optimizer_step) for ``micro_batches`` (1, length) sequences:
    (the step, the model, the optimizer). mode "bf16": autocast over fp32 weights on one GPU; "lean": bf16
    weights and AdamW8bit; "fsdp": FSDP2 over ``mesh``, the gradients synced on the last micro-batch only."""
    with torch.device(device):
        model = random_model(c, seed=0)
    if mode == "fsdp":
        shard(model, mesh, torch.bfloat16)
    if mode == "lean":
        model = lean_weights(model, world=1)
    model.gradient_checkpointing = True
    model.train()
    optimizer = make_optimizer(model, 1e-5, (0.9, 0.999), 0.01, TARGET, lean=mode == "lean")
    batches = [torch.randint(0, c.vocab_size, (1, length), device=device) for _ in range(micro_batches)]

    def step():
        optimizer_step(model, optimizer, [(ids,) for ids in batches], 1e-5, micro_batches * (length - 1),
                       dtype=torch.bfloat16, clip=1.0)
    return step, model, optimizer


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
    return step, model, optimizer


def step_figures(step, model, optimizer, device: torch.device, repeats: int, deadline: float) -> dict:
    """Seconds and peak GiB of a step: max_memory_allocated on CUDA, the live tensor peak of one more step on CPU."""
    seconds, timed, peak = measure(step, device, repeats, deadline)
    if device.type != "cuda":
        peak = live_tensor_peak(step, model, optimizer)["peak"] / GIB
    return {"seconds": seconds, "timed": timed, "peak_GiB": peak}


def train_case(stage: Stage, device: torch.device, dry: bool, compare: bool, deadline: float) -> dict:
    """One training row: measured at the full depth, or at SCALED_LAYERS blocks and extrapolated to all."""
    full = shape(stage.model, dry)
    depths = SCALED_LAYERS if stage.scaled else (full.num_hidden_layers,)
    with one_process_mesh(device) if stage.mode == "fsdp" else contextlib.nullcontext() as mesh:
        ours = []
        for k in depths:
            step, model, optimizer = ropelite_step(shape(stage.model, dry, k), stage.len, device, stage.mode,
                                                   stage.micro_batches, mesh)
            ours.append(step_figures(step, model, optimizer, device, stage.steps, deadline))
            optimizer_name = type(optimizer).__name__ + (" (fused)" if optimizer.defaults.get("fused") else "")
            del step, model, optimizer
            release(device)
    tokens = stage.len * stage.micro_batches
    seconds, peak = extrapolate(ours, depths, full.num_hidden_layers)
    flops = train_flops_per_token(full, stage.len) * tokens / seconds
    est = estimate(full, stage.len, lean=stage.mode == "lean", micro_batches=stage.micro_batches,
                   fsdp=stage.mode == "fsdp", device=device.type, fused=True)
    row = {"model": stage.model + (" (toy)" if dry else ""), "len": stage.len, "mode": stage.mode,
           "micro_batches": stage.micro_batches, "optimizer": optimizer_name, "layers_measured": list(depths),
           "layers": full.num_hidden_layers, "timed_steps": min(f["timed"] for f in ours),
           "scaled": f"scaled to {full.num_hidden_layers} layers" if stage.scaled else "",
           "tokens_per_s": tokens / seconds, "step_s": seconds, "tflops": flops / 1e12, "peak_GiB": peak,
           "estimate_GiB": (est["total"] - est["cuda_context"]) / GIB, "estimate_peak_phase": est["peak_phase"]}
    if compare and stage.mode == "bf16":
        if time.perf_counter() > deadline:
            row["transformers"] = "skipped: the stage's time cap"
            return row
        theirs = []
        for k in depths:
            theirs.append(step_figures(*transformers_step(shape(stage.model, dry, k), stage.len, device), device,
                                       stage.steps, deadline))
            release(device)
        their_seconds, their_peak = extrapolate(theirs, depths, full.num_hidden_layers)
        row.update(transformers_tokens_per_s=stage.len / their_seconds, transformers_peak_GiB=their_peak,
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


def eval_case(stage: Stage, device: torch.device, dry: bool, deadline: float) -> dict:
    """Forward of the chunked loss with bf16 weights and no gradients, as eval_ppl.py runs it on CUDA."""
    c = shape(stage.model, dry)
    with torch.device(device):
        model = random_model(c, seed=0).to(torch.bfloat16).eval()
    ids = torch.randint(0, c.vocab_size, (1, stage.len), device=device)
    with torch.no_grad():
        seconds, _, peak = measure(lambda: model.nll(ids), device, stage.steps, deadline)
        if device.type != "cuda":
            peak = live_tensor_peak(lambda: model.nll(ids), model)["peak"] / GIB
    model = None  # the closures above hold the name: drop the weights before the next case
    release(device)
    return {"model": stage.model + (" (toy)" if dry else ""), "len": stage.len, "tokens_per_s": stage.len / seconds,
            "seconds": seconds, "tflops": train_flops_per_token(c, stage.len) / 3 * stage.len / seconds / 1e12,
            "peak_GiB": peak, "estimate_GiB": eval_estimate(c, stage.len)["total"] / GIB}


def needle_case(stage: Stage, device: torch.device, dry: bool) -> dict:
    """Greedy decoding after a ``len``-token prompt with every step's attention entropy taken (needle.py's
    loop): decoding tokens/s = (new tokens - 1) / (time of generate - time of its prefill alone)."""
    c = shape(stage.model, dry)
    with torch.device(device):
        model = random_model(c, seed=0).to(torch.bfloat16).eval()
    ids = torch.randint(0, c.vocab_size, (1, stage.len), device=device)
    entropies = []

    def observe(layer, positions, probs):
        entropies.append(float(entropy(probs).mean()))

    last = torch.tensor([stage.len - 1])
    with torch.no_grad():
        prefill, _, _ = measure(lambda: model(ids, cache=model.new_cache(), on_attention=observe,
                                              attention_rows=last, last_only=True), device, 1)
        whole, _, peak = measure(lambda: generate(model, ids, stage.steps, on_attention=observe), device, 1)
        if device.type != "cuda":
            decode = live_tensor_peak(lambda: generate(model, ids, stage.steps, on_attention=observe), model)
            peak = decode["peak"] / GIB
    model = None  # the closures above hold the name: drop the weights before the next case
    release(device)
    return {"model": stage.model + (" (toy)" if dry else ""), "prompt_len": stage.len, "new_tokens": stage.steps,
            "prefill_s": prefill, "decode_tokens_per_s": (stage.steps - 1) / max(whole - prefill, 1e-9),
            "peak_GiB": peak, "mean_entropy_nats": sum(entropies) / len(entropies)}


# --------------------------------------------------------------------------------------------------------------
# The plan and the report
# --------------------------------------------------------------------------------------------------------------

def stage_name(stage: Stage) -> str:
    extra = {"bf16": "", "lean": " --lean", "fsdp": f" FSDP2 x{stage.micro_batches} micro-batches"}[stage.mode]
    return (f"{stage.kind} {stage.model} {stage.len}" + (extra if stage.kind == "train" else "") +
            (" (2 and 4 blocks)" if stage.scaled else ""))


def plan_rows(stages: list[Stage], dry: bool, rate: float) -> list[dict]:
    """Each stage's shapes, steps, expected seconds (FLOPs at PLAN_MFU of ``rate``, plus SETUP_S, plus COMPILE_S
    for lean) and cap."""
    return [{"stage": stage_name(s), "steps": s.steps,
             "expected_s": round(stage_flops(s, dry) / (PLAN_MFU * rate) + SETUP_S +
                                 (COMPILE_S if s.mode == "lean" else 0), 1),
             "cap_s": s.cap_s} for s in stages]


def fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if "error" in row or "skipped" in row:
            why = row.get("error") or "skipped: " + row["skipped"]
            lines.append(f"| {row.get('model', row.get('stage', ''))} | {why} |")
        else:
            lines.append("| " + " | ".join(fmt(row.get(k)) for k in columns) + " |")
    return lines


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# GPU benchmark: {env.get('gpu', env['device'])}", "", result["note"], "",
             "`" + result["command"] + "`; " + ", ".join(f"{k} {fmt(v)}" for k, v in env.items()), "",
             f"Peak memory: {result['memory_basis']}. MFU: {result['mfu_basis']}.", "",
             f"## Plan (budget {BUDGET_S} s; took {result['seconds']:.0f} s)", ""]
    lines += table(result["plan"], ["stage", "steps", "expected_s", "cap_s"])
    lines += ["", "## Attention kernel chosen for CUDA, per dtype", ""]
    lines += table(result["kernels"], ["model", "dtype", "call", "heads", "choice", "ran", "error_path"])
    lines += ["", "## Training step (bf16, checkpointing, chunked loss; one sequence per micro-batch)", "",
              result["flops"], ""]
    lines += table(result["train"], ["model", "len", "mode", "optimizer", "scaled", "tokens_per_s", "tflops", "mfu",
                                     "peak_GiB", "estimate_GiB", "speed_ratio_vs_transformers",
                                     "transformers_peak_GiB"])
    lines += ["", "## Evaluation: chunked-loss forward (bf16 weights)", ""]
    lines += table(result["eval"], ["model", "len", "tokens_per_s", "tflops", "peak_GiB", "estimate_GiB"])
    lines += ["", "## Needle decoding with attention entropy", ""]
    lines += table(result["needle"], ["model", "prompt_len", "new_tokens", "prefill_s", "decode_tokens_per_s",
                                      "peak_GiB", "mean_entropy_nats"])
    return "\n".join(lines) + "\n"


def device_slug(device: torch.device, dry: bool) -> str:
    if dry:
        return "dry-run-" + device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def main(argv=None) -> Path:
    p = ArgumentParser(prog="gpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="toy sizes on CPU (or --device), the same code paths: checks the script, measures nothing "
                        "about any GPU")
    p.add_argument("--device", default=None, help="torch device (default: cuda; cpu with --dry-run)")
    p.add_argument("--out", default=None, help="folder for gpu-<device>.json and .md (default benchmarks/results; "
                                               "runs/gpu for a dry run)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RopeliteError("no CUDA device here: run on a GPU machine, or pass --dry-run")
    out_dir = Path(args.out or ("runs/gpu" if args.dry_run else Path(__file__).resolve().parent / "results"))
    stages = DRY if args.dry_run else FULL
    assert sum(s.cap_s for s in stages) <= BUDGET_S, "the stages' caps must fit the budget"
    compare = has_transformers() and not args.no_transformers
    began = time.perf_counter()

    def say(what):
        print(f"[{time.perf_counter() - began:6.1f} s] {what}", file=sys.stderr, flush=True)
    rate = matmul_rate(device, args.dry_run)
    basis = datasheet_flops(device)
    plan = plan_rows(stages, args.dry_run, basis or rate)
    say(f"plan (budget {BUDGET_S} s, caps {sum(s.cap_s for s in stages):.0f} s; expected seconds at "
        f"{PLAN_MFU:.0%} of {(basis or rate) / 1e12:.3g} TFLOP/s):\n" +
        "\n".join(f"    {r['stage']:<55} steps {r['steps']:>3}  expected {r['expected_s']:>6} s  cap {r['cap_s']:>4} s"
                  for r in plan))
    result = {"note": ("DRY RUN at toy sizes on CPU: the GPU code paths, not GPU figures (CPU figures, marked)"
                       if args.dry_run else
                       "Measured on this GPU in one run; estimates are benchmarks/memory_estimate.py's, computed."),
              "command": "python benchmarks/gpu.py" + (" --dry-run" if args.dry_run else ""),
              "environment": environment(device, rate), "plan": plan,
              "memory_basis": ("max_memory_allocated" if device.type == "cuda" else
                               "CPU figure: live tensors of one more step (measure.live_tensor_peak)"),
              "mfu_basis": (f"the datasheet's dense bf16 peak, {basis / 1e12:.0f} TFLOP/s" if basis else
                            f"{'CPU figure: ' if device.type != 'cuda' else ''}this device's measured bf16 matmul "
                            f"rate, {rate / 1e12:.3g} TFLOP/s"),
              "flops": "model FLOPs per token = 6 N + 6 n_layers n_heads head_dim len (N: multiplying parameters; "
                       "causal attention; recomputation not counted)",
              "kernels": [], "train": [], "eval": [], "needle": []}
    for stage in stages:
        name = stage_name(stage)
        skip = ("its cap no longer fits the budget" if time.perf_counter() - began + stage.cap_s > BUDGET_S else
                f"--lean needs {LEAN_PACKAGE}, not installed" if stage.mode == "lean" and not has_torchao() else None)
        if skip:
            say(f"{name}: skipped, {skip}")
            result[stage.kind].append({"model": stage.model, "len": stage.len, "mode": stage.mode, "skipped": skip})
            continue
        say(name)
        deadline = time.perf_counter() + stage.cap_s
        if stage.kind == "kernels":
            result["kernels"] += kernels(stage, device, args.dry_run, deadline)
        elif stage.kind == "train":
            row = guarded(name, lambda: train_case(stage, device, args.dry_run, compare, deadline))
            if "tflops" in row:
                row["mfu"] = row["tflops"] * 1e12 / (basis or rate)
            result["train"].append({"model": stage.model, **row})
        elif stage.kind == "eval":
            result["eval"].append({"model": stage.model, **guarded(name, lambda: eval_case(stage, device,
                                                                                        args.dry_run, deadline))})
        else:
            result["needle"].append({"model": stage.model, **guarded(name, lambda: needle_case(stage, device,
                                                                                            args.dry_run))})
    result["seconds"] = time.perf_counter() - began
    out = out_dir / f"gpu-{device_slug(device, args.dry_run)}"
    write_json(out.with_suffix(".json"), result)
    text = markdown(result)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    print(text)
    say(f"written: {out}.json, {out}.md")
    return out.with_suffix(".json")


if __name__ == "__main__":
    run_script(main)
