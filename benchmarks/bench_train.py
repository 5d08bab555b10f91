"""CPU training speed and peak memory, with and without gradient checkpointing, and memory_estimate.py checked
against the measured memory.

    python benchmarks/bench_train.py                              # hidden 256, 4 blocks, vocab 8192, len 1024 and 4096
    python benchmarks/bench_train.py --len 512 2048 --steps 3 --out runs/bench_train

Each (len, checkpointing) configuration runs in a fresh Python subprocess, so that its peak resident memory
(VmHWM, see measure.py) is its own. The subprocess builds a random model and AdamW exactly as train.py does
(ropelite.train_utils), notes its resident memory, then runs --steps optimizer steps of one sequence of --len
tokens (fp32, the CPU recipe), then one more step under torch's MemTracker. Reported:
- tokens/s of the fastest step after the first (warm-up; the CPU is shared, the minimum is the least disturbed),
  and that step's CPU time (all threads; other processes on a shared CPU do not inflate it, so the cost of
  checkpointing is read from it);
- peak RSS, and rss_added = peak minus the RSS before the first step (gradients, AdamW moments, activations, plus
  what glibc's allocator and the runtime keep: an upper bound of tensor memory);
- tensor_peak: the peak of live tensor memory (weights included) that MemTracker saw, the CPU analogue of CUDA's
  max_memory_allocated, which is what memory_estimate.py predicts (estimate_total, same config, fp32);
  the ratios estimate_total / tensor_peak and (estimate_total - weights) / rss_added say how the estimate sits.
Results: bench_train.json and .csv in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import peak_rss_mb, rss_mb, run_worker  # noqa: E402
from memory_estimate import estimate, param_count  # noqa: E402
from ropelite.cli import run  # noqa: E402
from ropelite.errors import RopeliteError  # noqa: E402
from ropelite.io import write_results  # noqa: E402
from ropelite.model import LlamaConfig  # noqa: E402
from ropelite.rope import RopeConfig  # noqa: E402

MIB = 2**20


def small_config(args) -> LlamaConfig:
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.heads // 2, head_dim=args.hidden // args.heads,
                       rope=RopeConfig(theta=1e4, original_max_position_embeddings=max(args.len)))


def child(spec: dict) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    from ropelite.train_utils import accumulate_gradients, clip_gradients, random_model
    config = LlamaConfig(**{**spec["config"], "rope": RopeConfig(**spec["config"]["rope"])})
    model = random_model(config, seed=0).train()
    model.gradient_checkpointing = spec["grad_ckpt"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (spec["steps"], 1, spec["len"]))
    before = rss_mb()
    def optimizer_step(x: torch.Tensor) -> None:
        accumulate_gradients(model, [x], n_predicted=spec["len"] - 1)
        clip_gradients(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times, cpu_times = [], []
    for step in range(spec["steps"]):
        tick, cpu_tick = time.perf_counter(), time.process_time()
        optimizer_step(ids[step])
        times.append(time.perf_counter() - tick)
        cpu_times.append(time.process_time() - cpu_tick)
    peak = peak_rss_mb()
    fastest, least_cpu = min(times[1:] or times), min(cpu_times[1:] or cpu_times)
    tensor_peak = None
    try:  # a private torch tool: leave the column empty where it is missing
        from torch.distributed._tools.mem_tracker import MemTracker
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            optimizer_step(ids[0])
        tensor_peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] / MIB
    except (ImportError, NotImplementedError, KeyError):
        pass
    return {"rss_before_mb": before, "peak_rss_mb": peak, "added_mb": peak - before, "tensor_peak_mb": tensor_peak,
            "tokens_per_s": spec["len"] / fastest, "step_s": fastest, "step_cpu_s": least_cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--len", type=int, nargs="+", default=[1024, 4096], help="sequence lengths (default 1024 4096)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per configuration, the first is "
                                                       "warm-up (default 4)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default 256; SwiGLU inner = 3x)")
    p.add_argument("--layers", type=int, default=4, help="blocks (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads, half as many KV heads (default 4)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary (default 8192)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each subprocess (default 2)")
    p.add_argument("--out", default="runs/bench_train", help="folder for bench_train.json/.csv")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.len = list(dict.fromkeys(args.len))  # each length once: the summary pairs its two rows
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.steps < 1 or args.hidden % args.heads or args.heads % 2:
        raise RopeliteError("--steps must be >= 1, --heads even and dividing --hidden")
    config = small_config(args)
    spec_config = {k: v for k, v in vars(config).items() if k != "rope"} | {"rope": vars(config.rope)}
    rows = []
    for length in args.len:
        for grad_ckpt in (False, True):
            spec = {"config": spec_config, "len": length, "grad_ckpt": grad_ckpt, "steps": args.steps}
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            measured = run_worker([__file__, "--child", json.dumps(spec)], f"len {length} grad_ckpt {grad_ckpt}",
                                  env=env)
            est = estimate(config, length, 1, "fp32", grad_ckpt, 1)["total"] / MIB
            added = est - 4 * param_count(config) / MIB   # the weights exist before the first step
            tensor_peak = measured["tensor_peak_mb"]
            row = {"len": length, "grad_ckpt": grad_ckpt, "params_M": round(param_count(config) / 1e6, 2),
                   "tokens_per_s": round(measured["tokens_per_s"], 1), "step_s": round(measured["step_s"], 2),
                   "step_cpu_s": round(measured["step_cpu_s"], 2),
                   "peak_rss_mb": round(measured["peak_rss_mb"], 1),
                   "rss_before_mb": round(measured["rss_before_mb"], 1),
                   "rss_added_mb": round(measured["added_mb"], 1), "estimate_added_mb": round(added, 1),
                   "estimate_over_rss_added": round(added / measured["added_mb"], 2),
                   "tensor_peak_mb": tensor_peak and round(tensor_peak, 1), "estimate_total_mb": round(est, 1),
                   "estimate_over_tensor_peak": tensor_peak and round(est / tensor_peak, 2), "threads": args.threads}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_results(args.out, "bench_train", rows)
    for length in args.len:
        off, on = [r for r in rows if r["len"] == length]
        saved = {k: off[k] - on[k] for k in ("rss_added_mb", "estimate_added_mb")}
        tensor = "" if not on["tensor_peak_mb"] else f"{off['tensor_peak_mb'] - on['tensor_peak_mb']:.0f} (tensors) / "
        print(f"len {length}: checkpointing costs {on['step_cpu_s'] / off['step_cpu_s']:.2f}x CPU time "
              f"({off['tokens_per_s'] / on['tokens_per_s']:.2f}x wall), saves "
              f"{saved['rss_added_mb']:.0f} (RSS) / {tensor}{saved['estimate_added_mb']:.0f} (estimate) MiB")
    print(f"written: {args.out}/bench_train.json, .csv")


if __name__ == "__main__":
    run(main)
