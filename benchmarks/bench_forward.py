"""Forward speed and peak memory of ropelite's LLaMa in fp32 and bf16 against transformers (and a plain reference).

    python benchmarks/bench_forward.py                         # 2K, 8K: ropelite fp32 and bf16, transformers bf16
    python benchmarks/bench_forward.py --lengths 2048 --repeats 3 --out runs/bench_forward/2k
    python benchmarks/bench_forward.py --lengths 512 --runs fast:fp32 eager:fp32 reference:fp32 --threads 2

A SmolLM2-135M-sized model (30 layers, hidden 576, 9 heads / 3 KV heads, head_dim 64, vocab 49152, tied
embeddings, rope_theta 1e5) with random weights runs one forward over a sequence of each length on the CPU,
producing the last position's logits (the body of the model, which is what grows with the length; the (T x V)
logits are the same matmul for everyone and are left out). A run is IMPL:DTYPE, the weights and activations in
DTYPE (fp32, bf16), IMPL one of:

    fast         ropelite, scaled_dot_product_attention (the default path)
    eager        ropelite, softmax written out block by block (what on_attention uses)
    reference    a straightforward HF-style forward written here: repeat_kv, q k^T, a full T x T additive mask,
                 softmax, @ v
    transformers LlamaForCausalLM (its default attention), only if transformers is installed

The default runs are fast:fp32 (ropelite's exact reference), fast:bf16 (what --dtype auto runs on a CPU with
native bf16) and transformers:bf16. Each (run, length) is measured in a fresh subprocess, so its peak RSS is its
own: the kernel's high-water mark (VmHWM, restarted after the model is built; getrusage's ru_maxrss where that is
impossible -- tracemalloc does not see torch's allocations). forward_extra_mb = peak during the forward - RSS
before it; cpu_s = the forward's CPU time (all threads). Before timing, one small forward checks that every run
agrees with fast:fp32 on the same weights (agreement.json: max |logit difference|, ~1e-5 in fp32, ~1e-1 in bf16).
Results: bench_forward.json and .csv in --out, rewritten after every round; tokens/s and memory are also given
as ratios within the run to fast:fp32 (speed_vs_fp32), transformers:bf16 (speed_vs_transformers) and, when it
runs, reference:fp32 (speed_vs_reference). The CPU may be shared: compare ratios within one run (use --repeats:
the fastest of the rounds is kept), not numbers across runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ropelite, imported before torch
from ropelite.cli import DTYPES, ArgumentParser, check, run_script  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from measure import has_transformers, peak_rss_mb, reset_peak_rss, rss_mb, run_worker  # noqa: E402
from ropelite.errors import RopeliteError  # noqa: E402
from ropelite.io import write_json, write_results  # noqa: E402
from ropelite.hf import config_to_hf, hf_name  # noqa: E402
from ropelite.model import Llama, LlamaConfig  # noqa: E402
from ropelite.presets import preset  # noqa: E402

IMPLS = ("fast", "eager", "reference", "transformers")
RUNS = ["fast:fp32", "fast:bf16", "transformers:bf16"]
BASELINES = {"fp32": "fast:fp32", "transformers": "transformers:bf16", "reference": "reference:fp32"}


def smollm2_config() -> LlamaConfig:
    return preset("SmolLM2-135M")


# --------------------------------------------------------------------------------------------------------------
# The plain reference: what a LLaMa forward looks like when written the obvious way
# --------------------------------------------------------------------------------------------------------------

def reference_forward(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits (B, V) from ``model``'s weights, HF-eager style, sharing no code with ropelite: in the
    weights' dtype, with the norms' mean square and the softmax in float32 and the RoPE tables cast to it."""
    c = model.config
    B, T = ids.shape
    H, Hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    dtype = model.embed_tokens.weight.dtype

    def rms(x, w):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)).to(dtype)

    def rotate(x, cos, sin):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    inv_freq = 1.0 / (c.rope.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]     # (T, d/2)
    emb = torch.cat([freqs, freqs], -1)                                            # (T, d)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    mask = torch.full((T, T), float("-inf")).triu(1).to(dtype)                     # (T, T) additive causal mask
    x = model.embed_tokens.weight[ids]                                             # (B, T, C)
    for block in model.layers:
        a = block.self_attn
        h = rms(x, block.input_layernorm.weight)
        q = (h @ a.q_proj.weight.T).view(B, T, H, d).transpose(1, 2)               # (B, H, T, d)
        k = (h @ a.k_proj.weight.T).view(B, T, Hkv, d).transpose(1, 2)             # (B, Hkv, T, d)
        v = (h @ a.v_proj.weight.T).view(B, T, Hkv, d).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = k[:, :, None].expand(B, Hkv, H // Hkv, T, d).reshape(B, H, T, d)      # repeat_kv
        v = v[:, :, None].expand(B, Hkv, H // Hkv, T, d).reshape(B, H, T, d)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mask                     # (B, H, T, T)
        out = (scores.softmax(-1, dtype=torch.float32).to(dtype) @ v).transpose(1, 2).reshape(B, T, H * d)
        x = x + out @ a.o_proj.weight.T
        h = rms(x, block.post_attention_layernorm.weight)
        m = block.mlp
        x = x + (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rms(x[:, -1], model.norm.weight) @ model.lm_head.weight.T


def transformers_model(config: LlamaConfig, weights_from: Llama | None = None):
    import transformers
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(config).items() if k != "ropelite"})
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    if weights_from is not None:
        hf.load_state_dict({hf_name(k): v for k, v in weights_from.state_dict().items()})
    return hf


def runner(impl: str, model):
    """A function ids -> last-position logits (B, V) for the implementation."""
    if impl == "fast":
        return lambda ids: model(ids, last_only=True)[:, -1]
    if impl == "eager":
        return lambda ids: model(ids, eager=True, last_only=True)[:, -1]
    if impl == "reference":
        return lambda ids: reference_forward(model, ids)
    return lambda ids: model(ids, use_cache=False, logits_to_keep=1).logits[:, -1]


def parse_run(text: str) -> tuple[str, str]:
    """'fast:bf16' -> ('fast', 'bf16')."""
    impl, _, dtype = text.partition(":")
    if impl not in IMPLS or dtype not in ("fp32", "bf16"):
        raise argparse.ArgumentTypeError(f"not a run: {text!r} (IMPL:DTYPE, IMPL one of {', '.join(IMPLS)}, "
                                         "DTYPE fp32 or bf16)")
    return impl, dtype


def build(run: str, weights_from: Llama | None = None):
    """The run's model in its dtype: random weights (seed 0), or ``weights_from``'s."""
    impl, dtype = parse_run(run)
    torch.manual_seed(0)
    config = smollm2_config()
    if impl == "transformers":
        model = transformers_model(config, weights_from)
    else:
        model = weights_from or Llama(config).eval()
    return model.to(DTYPES[dtype])


def random_ids(length: int) -> torch.Tensor:
    """(1, length) token ids, the same in every process."""
    return torch.randint(0, smollm2_config().vocab_size, (1, length), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------------------------
# One configuration, in its own process
# --------------------------------------------------------------------------------------------------------------

def measure_one(run: str, length: int, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    model = build(run)
    forward = runner(parse_run(run)[0], model)
    ids = random_ids(length)
    with torch.inference_mode():
        forward(ids[:, :128])                                    # warm-up: one-time allocations, kernels
        reset = reset_peak_rss()
        before = rss_mb() if reset else peak_rss_mb()
        start, cpu_start = time.perf_counter(), time.process_time()
        forward(ids)
        seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    peak = peak_rss_mb()
    return {"run": run, "length": length, "threads": torch.get_num_threads(), "seconds": round(seconds, 3),
            "cpu_s": round(cpu_s, 3), "rss_before_mb": round(before), "peak_rss_mb": round(peak),
            "forward_extra_mb": round(peak - before), "peak_reset": reset}


def agreement(runs: list[str], length: int = 256) -> dict:
    """Max |difference| of each run's last logits from fast:fp32's, same weights."""
    model, ids = build("fast:fp32"), random_ids(length)
    with torch.inference_mode():
        fast = runner("fast", model)(ids)
        out = {"length": length, "logit_scale": float(fast.abs().max())}
        for run in runs:
            if run != "fast:fp32":
                other = build(run, weights_from=copy.deepcopy(model))
                out[run] = float((runner(parse_run(run)[0], other)(ids).float() - fast).abs().max())
    return out


def measure_in_subprocess(run: str, length: int, threads: int | None) -> dict:
    """measure_one in a fresh process, so its peak memory is its own; a failure becomes an error row."""
    argv = [__file__, "--one", run, str(length)] + (["--threads", str(threads)] if threads else [])
    try:
        return run_worker(argv, f"{run} at {length}")
    except RopeliteError as e:
        return {"run": run, "length": length, "error": str(e)}


def summarize(runs: dict[str, list[dict]], length: int) -> list[dict]:
    """One row per run: fastest forward, largest peak, ratios to the baselines of the same run."""
    rows = []
    for run, measured in runs.items():
        ok = [m for m in measured if "error" not in m]
        if not ok:
            rows.append({"run": run, "length": length, "rounds": 0, "error": measured[-1]["error"]})
            continue
        best = min(ok, key=lambda m: m["seconds"])
        rows.append({"run": run, "length": length, "threads": best["threads"], "rounds": len(ok),
                     "seconds": best["seconds"], "seconds_all": [m["seconds"] for m in ok],
                     "cpu_s": min(m["cpu_s"] for m in ok),
                     "tokens_per_s": round(length / best["seconds"], 1),
                     "rss_before_mb": max(m["rss_before_mb"] for m in ok),
                     "peak_rss_mb": max(m["peak_rss_mb"] for m in ok),
                     "forward_extra_mb": max(m["forward_extra_mb"] for m in ok),
                     "peak_reset": all(m["peak_reset"] for m in ok)})
    for name, baseline in BASELINES.items():
        base = next((r for r in rows if r["run"] == baseline and "error" not in r), None)
        for row in rows:
            if base and "error" not in row:
                row[f"speed_vs_{name}"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
                row[f"memory_vs_{name}"] = round(row["forward_extra_mb"] / max(base["forward_extra_mb"], 1), 3)
    return rows


# --------------------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------------------

def main() -> None:
    p = ArgumentParser(prog="bench_forward.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192],
                   help="sequence lengths in tokens (default: 2048 8192; at 8192 the reference needs ~8 GB)")
    p.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(r) for r in RUNS], metavar="IMPL:DTYPE",
                   help=f"what to time, IMPL ({', '.join(IMPLS)}) in DTYPE (fp32, bf16) (default: {' '.join(RUNS)}; "
                        "transformers runs only if it is installed)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds: each round times every run once, each in a fresh process, the order rotated; "
                        "the fastest forward and the largest peak are kept. On a shared CPU, rounds spread the "
                        "other jobs' load over all runs alike (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in each measurement (default: ropelite.cli.set_threads' choice)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the 256-token agreement check of the runs before timing")
    p.add_argument("--out", default="runs/bench_forward", help="output folder (default runs/bench_forward)")
    p.add_argument("--one", nargs=2, metavar=("IMPL:DTYPE", "LENGTH"),
                   help="measure one configuration in this process and print its row as JSON (the driver "
                        "calls itself this way, one fresh process per configuration)")
    args = p.parse_args()
    check(args.repeats >= 1, "--repeats must be at least 1")
    check(all(n >= 128 for n in args.lengths), "--lengths must be at least 128 tokens each")

    if args.one:
        run, length = args.one
        try:
            parse_run(run)
        except argparse.ArgumentTypeError as e:
            raise RopeliteError(f"--one: {e}") from None
        print(json.dumps(measure_one(run, int(length), args.threads)))
        return

    runs_asked = list(dict.fromkeys(f"{impl}:{dtype}" for impl, dtype in args.runs))
    runs = [r for r in runs_asked if not r.startswith("transformers:") or has_transformers()]
    if runs != runs_asked:
        print("bench_forward: transformers is not installed; its runs are skipped", file=sys.stderr)
    out = Path(args.out)
    if not args.no_check:
        agree = agreement(runs)
        print(f"agreement at {agree['length']} tokens, max |logit difference| vs fast:fp32 "
              f"(logits up to {agree['logit_scale']:.2f}): "
              + ", ".join(f"{k} {v:.2e}" for k, v in agree.items() if k in runs), flush=True)
        write_json(out / "agreement.json", agree)

    rows: list[dict] = []
    for length in args.lengths:
        measured: dict[str, list[dict]] = {run: [] for run in runs}
        for r in range(args.repeats):
            for run in runs[r % len(runs):] + runs[:r % len(runs)]:
                measured[run].append(measure_in_subprocess(run, length, args.threads))
                print(f"round {r + 1}/{args.repeats}: {measured[run][-1]}", flush=True)
            rows = [row for row in rows if row["length"] != length] + summarize(measured, length)
            write_results(out, "bench_forward", rows)
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items() if k != "seconds_all"))
    print(f"wrote {out / 'bench_forward.json'} and .csv")


if __name__ == "__main__":
    run_script(main)
