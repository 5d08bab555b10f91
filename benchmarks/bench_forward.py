"""Forward speed and peak memory of ropelite's LLaMa against a plain PyTorch reference (and transformers).

    python benchmarks/bench_forward.py                         # 2K and 8K, every implementation available
    python benchmarks/bench_forward.py --lengths 2048 --repeats 3 --out runs/bench_forward/2k
    python benchmarks/bench_forward.py --lengths 512 --impl fast reference --threads 2

A SmolLM2-135M-sized model (30 layers, hidden 576, 9 heads / 3 KV heads, head_dim 64, vocab 49152, tied
embeddings, rope_theta 1e5) with random weights runs one forward over a sequence of each length on the CPU in
fp32, producing the last position's logits (the body of the model, which is what grows with the length; the
(T x V) logits are the same matmul for everyone and are left out). Implementations:

    fast         ropelite, scaled_dot_product_attention (the default path)
    eager        ropelite, softmax written out block by block (what on_attention uses)
    reference    a straightforward HF-style forward written here: repeat_kv, q k^T, a full T x T additive mask,
                 softmax, @ v -- the baseline every ratio is taken against
    transformers LlamaForCausalLM (its default attention), only if transformers is installed

Each (implementation, length) runs in a fresh subprocess, so its peak RSS is its own: the kernel's high-water mark
(VmHWM, restarted after the model is built; getrusage's ru_maxrss where that is impossible -- tracemalloc does not
see torch's allocations). forward_extra_mb = peak during the forward - RSS before it. Before timing, one small
forward checks that the implementations agree on the same weights (agreement.json). Results: bench_forward.json
and .csv in --out, rewritten after every round; tokens/s and memory are also given as ratios to the reference of
the same run. The CPU may be shared: compare ratios within one run (use --repeats), not numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from measure import has_transformers, peak_rss_mb, reset_peak_rss, rss_mb, run_worker

from ropelite.cli import ArgumentParser, check, run_script
from ropelite.errors import RopeliteError
from ropelite.io import write_json, write_results
from ropelite.hf import config_to_hf, hf_name
from ropelite.model import Llama, LlamaConfig
from ropelite.presets import preset

IMPLS = ("fast", "eager", "reference", "transformers")


def smollm2_config() -> LlamaConfig:
    return preset("SmolLM2-135M")


# --------------------------------------------------------------------------------------------------------------
# The plain reference: what a LLaMa forward looks like when written the obvious way
# --------------------------------------------------------------------------------------------------------------

def reference_forward(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits (B, V) from ``model``'s weights, HF-eager style, sharing no code with ropelite."""
    c = model.config
    B, T = ids.shape
    H, Hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps))

    def rotate(x, cos, sin):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    inv_freq = 1.0 / (c.rope.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]     # (T, d/2)
    emb = torch.cat([freqs, freqs], -1)                                            # (T, d)
    cos, sin = emb.cos(), emb.sin()
    mask = torch.full((T, T), float("-inf")).triu(1)                               # (T, T) additive causal mask
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
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * d)
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


def build(impl: str):
    torch.manual_seed(0)
    config = smollm2_config()
    return transformers_model(config) if impl == "transformers" else Llama(config).eval()


def random_ids(length: int) -> torch.Tensor:
    """(1, length) token ids, the same in every process."""
    return torch.randint(0, smollm2_config().vocab_size, (1, length), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------------------------
# One configuration, in its own process
# --------------------------------------------------------------------------------------------------------------

def measure_one(impl: str, length: int, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    model = build(impl)
    forward = runner(impl, model)
    ids = random_ids(length)
    with torch.inference_mode():
        forward(ids[:, :128])                                    # warm-up: one-time allocations, kernels
        reset = reset_peak_rss()
        before = rss_mb() if reset else peak_rss_mb()
        start = time.perf_counter()
        forward(ids)
        seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {"impl": impl, "length": length, "threads": torch.get_num_threads(), "seconds": round(seconds, 3),
            "rss_before_mb": round(before), "peak_rss_mb": round(peak), "forward_extra_mb": round(peak - before),
            "peak_reset": reset}


def agreement(length: int = 256) -> dict:
    """Max |difference| of each implementation's last logits from ropelite's fast path, same weights."""
    model, ids = build("fast"), random_ids(length)
    with torch.inference_mode():
        fast = runner("fast", model)(ids)
        out = {"length": length, "logit_scale": float(fast.abs().max())}
        for impl in IMPLS[1:]:
            if impl == "transformers" and not has_transformers():
                continue
            other = transformers_model(model.config, model) if impl == "transformers" else model
            out[impl] = float((runner(impl, other)(ids) - fast).abs().max())
    return out


def measure_in_subprocess(impl: str, length: int, threads: int | None) -> dict:
    """measure_one in a fresh process, so its peak memory is its own; a failure becomes an error row."""
    argv = [__file__, "--one", impl, str(length)] + (["--threads", str(threads)] if threads else [])
    try:
        return run_worker(argv, f"{impl} at {length}")
    except RopeliteError as e:
        return {"impl": impl, "length": length, "error": str(e)}


def summarize(runs: dict[str, list[dict]], length: int) -> list[dict]:
    """One row per implementation: fastest forward, largest peak, ratios to the reference of the same run."""
    rows = []
    for impl, measured in runs.items():
        ok = [m for m in measured if "error" not in m]
        if not ok:
            rows.append({"impl": impl, "length": length, "rounds": 0, "error": measured[-1]["error"]})
            continue
        best = min(ok, key=lambda m: m["seconds"])
        rows.append({"impl": impl, "length": length, "threads": best["threads"], "rounds": len(ok),
                     "seconds": best["seconds"], "seconds_all": [m["seconds"] for m in ok],
                     "tokens_per_s": round(length / best["seconds"], 1),
                     "rss_before_mb": max(m["rss_before_mb"] for m in ok),
                     "peak_rss_mb": max(m["peak_rss_mb"] for m in ok),
                     "forward_extra_mb": max(m["forward_extra_mb"] for m in ok),
                     "peak_reset": all(m["peak_reset"] for m in ok)})
    ref = next((r for r in rows if r["impl"] == "reference" and "error" not in r), None)
    for row in rows:
        if ref and "error" not in row:
            row["speed_vs_reference"] = round(row["tokens_per_s"] / ref["tokens_per_s"], 2)
            row["memory_vs_reference"] = round(row["forward_extra_mb"] / max(ref["forward_extra_mb"], 1), 3)
    return rows


# --------------------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------------------

def main() -> None:
    p = ArgumentParser(prog="bench_forward.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192],
                   help="sequence lengths in tokens (default: 2048 8192; at 8192 the reference needs ~8 GB)")
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=None,
                   help="implementations to time (default: all; transformers only if installed)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds: each round times every implementation once, each in a fresh process, the "
                        "order rotated; the fastest forward and the largest peak are kept. On a shared CPU, "
                        "rounds spread the other jobs' load over all implementations alike (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in each measurement (default: torch's own choice)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the 256-token agreement check of the implementations before timing")
    p.add_argument("--out", default="runs/bench_forward", help="output folder (default runs/bench_forward)")
    p.add_argument("--one", nargs=2, metavar=("IMPL", "LENGTH"),
                   help="measure one configuration in this process and print its row as JSON (the driver "
                        "calls itself this way, one fresh process per configuration)")
    args = p.parse_args()
    check(args.repeats >= 1, "--repeats must be at least 1")
    check(all(n >= 128 for n in args.lengths), "--lengths must be at least 128 tokens each")

    if args.one:
        impl, length = args.one
        check(impl in IMPLS, f"--one: unknown implementation '{impl}'; choose from {', '.join(IMPLS)}")
        print(json.dumps(measure_one(impl, int(length), args.threads)))
        return

    impls = args.impl or [i for i in IMPLS if i != "transformers" or has_transformers()]
    check("transformers" not in impls or has_transformers(), "--impl transformers: transformers is not installed")
    out = Path(args.out)
    if not args.no_check:
        agree = agreement()
        print(f"agreement at {agree['length']} tokens, max |logit difference| vs fast path "
              f"(logits up to {agree['logit_scale']:.2f}): "
              + ", ".join(f"{k} {v:.2e}" for k, v in agree.items() if k in IMPLS), flush=True)
        write_json(out / "agreement.json", agree)

    rows: list[dict] = []
    for length in args.lengths:
        runs: dict[str, list[dict]] = {impl: [] for impl in impls}
        for r in range(args.repeats):
            order = impls[r % len(impls):] + impls[:r % len(impls)]
            for impl in order:
                runs[impl].append(measure_in_subprocess(impl, length, args.threads))
                print(f"round {r + 1}/{args.repeats}: {runs[impl][-1]}", flush=True)
            rows = [row for row in rows if row["length"] != length] + summarize(runs, length)
            write_results(out, "bench_forward", rows)
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    print(f"wrote {out / 'bench_forward.json'} and .csv")


if __name__ == "__main__":
    run_script(main)
