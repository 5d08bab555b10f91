"""CPU training speed and peak memory: with and without gradient checkpointing, memory_estimate.py checked against
the measured memory; and (--vs-transformers) one training step side by side with transformers' LlamaForCausalLM.

    python benchmarks/bench_train.py                              # hidden 256, 4 blocks, vocab 8192, len 1024 and 4096
    python benchmarks/bench_train.py --len 512 2048 --steps 3 --out runs/bench_train
    python benchmarks/bench_train.py --vs-transformers --len 2048 8192 --repeats 3   # the default runs
    python benchmarks/bench_train.py --vs-transformers --len 8192 --impls ropelite-keep:bf16 --repeats 2
    git archive HEAD~1 ropelite | tar -x -C /tmp/old && \
        python benchmarks/bench_train.py --vs-transformers --len 2048 --baseline /tmp/old   # + another commit's

Each (len, checkpointing) configuration runs in a fresh Python subprocess, so that its peak resident memory
(VmHWM, see measure.py) is its own. The subprocess builds a random model and AdamW exactly as train.py does
(ropelite.training, ropelite.parallel), notes its resident memory, then runs --steps of train.py's optimizer
steps (ropelite.trainer) on one sequence of --len tokens (fp32, the CPU recipe), then one more step with its live
tensors counted (measure.live_tensor_peak). Reported:
- tokens/s of the fastest step after the first (warm-up; the CPU is shared, the minimum is the least disturbed),
  and that step's CPU time (all threads; other processes on a shared CPU do not inflate it, so the cost of
  checkpointing is read from it);
- peak RSS, and rss_added = peak minus the RSS before the first step (gradients, AdamW moments, activations, plus
  what glibc's allocator and the runtime keep: an upper bound of tensor memory);
- tensor_peak: the peak of live tensor memory (weights included) of that step, the CPU analogue of CUDA's
  max_memory_allocated, which is what memory_estimate.py predicts (estimate_total, same config, fp32);
  the ratios estimate_total / tensor_peak and (estimate_total - weights) / rss_added say how the estimate sits.
Results: bench_train.json and .csv in --out.

--vs-transformers: a SmolLM2-135M-shaped model (random N(0, 0.02) weights, the same in both: transformers gets
ropelite's state dict), the same --len random tokens, gradient checkpointing on both, one forward + backward
of the mean next-token loss (ropelite: Llama.nll, the chunked loss; transformers: forward with labels;
ropelite-keep: ropelite with Llama.keep_attention, checkpointing that keeps the attention kernel's output), each
IMPL:DTYPE, fp32 or bf16 (autocast over fp32 weights, as train.py's --dtype bf16 and Hugging Face's Trainer run
it); the default runs are ropelite fp32, ropelite bf16, ropelite-keep bf16 and transformers bf16. Each
measurement is a fresh process (after a 128-token warm-up step whose gradients are freed, the VmHWM peak is
restarted): step_s, step_cpu_s (the step's CPU time: with one thread, what other processes on shared cores
inflate least), peak_rss_mb (weights included), step_added_mb (peak minus the RSS before the step:
gradients, activations, logits), floor_mb (the RSS after the warm-up step, before its gradients are freed: the
Python and torch runtime, the weights and a full set of gradient buffers, which every training step holds at its
end whatever its implementation) and above_floor_mb = peak_rss_mb - floor_mb (what the step's activations, loss
and temporaries cost beyond that floor). --repeats rounds alternate the order of the runs; the summary gives
medians over rounds, the spread, and ratios taken within each round against transformers bf16 (always run) and
ropelite fp32 (when run), then their median.
The RSS peak is also glibc's: tensors under its dynamic mmap threshold (up to 32 MB: at 8K the (T, C) activations)
come from the heap, whose freed holes stay resident; `MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bench_train.py
...` (a glibc tunable, inherited by both implementations' workers) maps each of them and returns it on free, so that
the RSS peak follows the tensors' own.
--baseline DIR adds the ropelite in DIR (a checkout of another commit: its workers import ropelite from there),
once in each dtype of the runs. Results: bench_train_vs_transformers.json/.csv (every measurement) and
bench_train_vs_transformers_summary.json/.csv in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# The ropelite measured: this checkout's, or for --baseline's workers the one in ROPELITE_SRC (set by the driver).
sys.path.insert(0, os.environ.get("ROPELITE_SRC") or str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ropelite.cli import ArgumentParser, check, run_script  # noqa: E402  (before torch: ropelite/__init__.py)
from measure import has_transformers, live_tensor_peak, peak_rss_mb, reset_peak_rss, rss_mb, run_worker  # noqa: E402
from memory_estimate import estimate, param_count  # noqa: E402
from ropelite.errors import RopeliteError  # noqa: E402
from ropelite.io import write_results  # noqa: E402
from ropelite.model import LlamaConfig  # noqa: E402
from ropelite.rope import RopeConfig  # noqa: E402

MIB = 2**20
SIDE_BY_SIDE = "bench_train_vs_transformers"
IMPLS = ["ropelite", "ropelite-keep", "transformers"]  # --vs-transformers: ropelite-keep = with keep_attention
RUNS = ["ropelite:fp32", "ropelite:bf16", "ropelite-keep:bf16", "transformers:bf16"]   # --vs-transformers' default
BASELINES = {"transformers": "transformers:bf16", "fp32": "ropelite:fp32"}           # ratio name -> its run


def small_config(args) -> LlamaConfig:
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.heads // 2, head_dim=args.hidden // args.heads,
                       rope=RopeConfig(theta=1e4, original_max_position_embeddings=max(args.len)))


def child(spec: dict) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    from ropelite.parallel import make_optimizer
    from ropelite.trainer import optimizer_step as trainer_step
    from ropelite.training import random_model
    config = LlamaConfig(**{**spec["config"], "rope": RopeConfig(**spec["config"]["rope"])})
    model = random_model(config, seed=0).train()
    model.gradient_checkpointing = spec["grad_ckpt"]
    optimizer = make_optimizer(model, 1e-4, (0.9, 0.95), 0.0, torch.device("cpu"))
    ids = torch.randint(0, config.vocab_size, (spec["steps"], 1, spec["len"]))
    before = rss_mb()
    def optimizer_step(x: torch.Tensor) -> None:  # train.py's step: accumulate, clip at 1, AdamW
        trainer_step(model, optimizer, [(x,)], 1e-4, n_predicted=spec["len"] - 1, clip=1.0)

    times, cpu_times = [], []
    for step in range(spec["steps"]):
        tick, cpu_tick = time.perf_counter(), time.process_time()
        optimizer_step(ids[step])
        times.append(time.perf_counter() - tick)
        cpu_times.append(time.process_time() - cpu_tick)
    peak = peak_rss_mb()
    fastest, least_cpu = min(times[1:] or times), min(cpu_times[1:] or cpu_times)
    tensor_peak = live_tensor_peak(lambda: optimizer_step(ids[0]), model, optimizer)["peak"] / MIB
    return {"rss_before_mb": before, "peak_rss_mb": peak, "added_mb": peak - before, "tensor_peak_mb": tensor_peak,
            "tokens_per_s": spec["len"] / fastest, "step_s": fastest, "step_cpu_s": least_cpu}


# --------------------------------------------------------------------------------------------------------------
# --vs-transformers: one training step of ropelite and of transformers, same model and tokens
# --------------------------------------------------------------------------------------------------------------

def side_by_side_child(spec: dict) -> dict:
    """One step of one implementation ("ropelite", "ropelite-keep" = with keep_attention, "baseline" = ropelite
    from ROPELITE_SRC, "transformers") in spec["dtype"] (bf16: autocast over the fp32 weights)."""
    import torch

    from bench_forward import smollm2_config, transformers_model
    from ropelite.cli import DTYPES
    from ropelite.training import autocast, random_model
    cpu, dtype = torch.device("cpu"), DTYPES[spec["dtype"]]
    config = smollm2_config()
    model = random_model(config, seed=0).train()
    if spec["impl"] == "transformers":
        model = transformers_model(config, weights_from=model).train()  # ropelite's copy is dropped here
        model.gradient_checkpointing_enable()
        def loss(ids):
            return model(input_ids=ids, labels=ids, use_cache=False).loss
    else:
        model.gradient_checkpointing = True
        model.keep_attention = spec["impl"] == "ropelite-keep"
        def loss(ids):
            return model.nll(ids)[0] / (ids.shape[1] - 1)
    ids = torch.randint(0, config.vocab_size, (1, spec["len"]), generator=torch.Generator().manual_seed(1))
    with autocast(cpu, dtype):
        warm = loss(ids[:, :128])
    warm.backward()                              # warm-up: one-time allocations and kernel choices
    floor = rss_mb()                             # runtime + weights + their gradients: what no step goes below
    model.zero_grad(set_to_none=True)
    reset = reset_peak_rss()
    before = rss_mb() if reset else peak_rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    with autocast(cpu, dtype):
        value = loss(ids)
    value.backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = peak_rss_mb()
    return {"run": spec["run"], "impl": spec["impl"], "dtype": spec["dtype"], "len": spec["len"],
            "loss": value.item(), "step_s": round(seconds, 2),
            "step_cpu_s": round(cpu_seconds, 2),
            "tokens_per_s": round(spec["len"] / seconds, 1), "rss_before_mb": round(before),
            "peak_rss_mb": round(peak), "step_added_mb": round(peak - before), "floor_mb": round(floor),
            "above_floor_mb": round(peak - floor), "peak_reset": reset,
            "threads": torch.get_num_threads()}


def side_by_side_summary(rows: list[dict], length: int, runs: list[str]) -> list[dict]:
    """Medians over rounds per run, and each one's ratios to the BASELINES run within the same round."""
    rounds = {}
    for r in rows:
        if r["len"] == length:
            rounds.setdefault(r["round"], {})[r["run"]] = r
    complete = [by_run for by_run in rounds.values() if len(by_run) == len(runs)]
    out = []
    for run in runs:
        mine = [by_run[run] for by_run in complete]
        if not mine:
            continue
        steps = [m["step_s"] for m in mine]
        row = {"len": length, "run": run, "rounds": len(mine), "step_s_median": statistics.median(steps),
               "step_s_min": min(steps), "step_s_max": max(steps),
               "step_cpu_s_median": statistics.median(m["step_cpu_s"] for m in mine),
               "peak_rss_mb_median": statistics.median(m["peak_rss_mb"] for m in mine),
               "step_added_mb_median": statistics.median(m["step_added_mb"] for m in mine),
               "floor_mb_median": statistics.median(m["floor_mb"] for m in mine),
               "above_floor_mb_median": statistics.median(m["above_floor_mb"] for m in mine),
               "loss": mine[0]["loss"]}
        for base_name, base in BASELINES.items():
            if base not in runs:
                continue
            for key, name in (("step_s", "speed"), ("step_cpu_s", "cpu_speed"), ("peak_rss_mb", "peak"),
                              ("step_added_mb", "added"), ("above_floor_mb", "above_floor")):
                ratios = [by_run[base][key] / by_run[run][key] if name.endswith("speed") else
                          by_run[run][key] / by_run[base][key] for by_run in complete]
                row[f"{name}_vs_{base_name}_median"] = round(statistics.median(ratios), 3)
                row[f"{name}_vs_{base_name}_all"] = [round(x, 3) for x in ratios]
        out.append(row)
    return out


def parse_run(text: str) -> str:
    """'ropelite-keep:bf16' as it is; an implementation alone ('ropelite-keep') runs in fp32."""
    impl, _, dtype = text.partition(":")
    if impl not in IMPLS or dtype not in ("", "fp32", "bf16"):
        raise argparse.ArgumentTypeError(f"not a run: {text!r} (IMPL[:DTYPE], IMPL one of {', '.join(IMPLS)}, "
                                         "DTYPE fp32 (default) or bf16)")
    return f"{impl}:{dtype or 'fp32'}"


def side_by_side(args) -> None:
    check(has_transformers(), "--vs-transformers: transformers is not installed")
    runs = list(dict.fromkeys([*args.impls, BASELINES["transformers"]]))
    runs += [f"baseline:{dtype}" for dtype in dict.fromkeys(r.split(":")[1] for r in runs)] if args.baseline else []
    if args.baseline:
        check((Path(args.baseline) / "ropelite" / "model.py").is_file(),
              f"--baseline {args.baseline}: no ropelite/model.py there")
    rows, summary = [], []
    for length in args.len:
        for r in range(args.repeats):
            for run in runs[r % len(runs):] + runs[:r % len(runs)]:  # the order rotates round by round
                impl, dtype = run.split(":")
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                if impl == "baseline":
                    env["ROPELITE_SRC"] = str(Path(args.baseline).resolve())
                spec = {"side_by_side": True, "run": run, "impl": impl, "dtype": dtype, "len": length}
                row = {"round": r + 1, **run_worker([__file__, "--child", json.dumps(spec)],
                                                    f"{run} at len {length}", env=env)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_results(args.out, SIDE_BY_SIDE, rows)
        summary += side_by_side_summary(rows, length, runs)
        write_results(args.out, f"{SIDE_BY_SIDE}_summary", summary)
    for row in summary:
        fp32 = (f", vs ropelite fp32 {row['speed_vs_fp32_median']:.2f}x (CPU time "
                f"{row['cpu_speed_vs_fp32_median']:.2f}x)" if "speed_vs_fp32_median" in row else "")
        print(f"len {row['len']} {row['run']:>18}: step {row['step_s_median']:.1f} s (median of {row['rounds']}, "
              f"{row['step_s_min']:.1f}-{row['step_s_max']:.1f}), peak {row['peak_rss_mb_median']:.0f} MB "
              f"(floor {row['floor_mb_median']:.0f}, above it {row['above_floor_mb_median']:.0f}); speed vs "
              f"transformers bf16 {row['speed_vs_transformers_median']:.2f}x (CPU time "
              f"{row['cpu_speed_vs_transformers_median']:.2f}x){fp32}, peak {row['peak_vs_transformers_median']:.2f}x, "
              f"above floor {row['above_floor_vs_transformers_median']:.2f}x; loss {row['loss']:.6f}")
    print(f"written: {args.out}/{SIDE_BY_SIDE}.json, _summary.json, .csv")


def main() -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--len", type=int, nargs="+", default=[1024, 4096], help="sequence lengths (default 1024 4096)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per configuration, the first is "
                                                       "warm-up (default 4)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default 256; SwiGLU inner = 3x)")
    p.add_argument("--layers", type=int, default=4, help="blocks (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads, half as many KV heads (default 4)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary (default 8192)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each subprocess (default 2)")
    p.add_argument("--out", default="runs/bench_train", help="folder for the results (default runs/bench_train)")
    g = p.add_argument_group("side by side with transformers")
    g.add_argument("--vs-transformers", action="store_true",
                   help="instead of the table above: one training step of a SmolLM2-135M-shaped model in ropelite "
                        "and in transformers' LlamaForCausalLM at each --len (use e.g. --len 2048 8192)")
    g.add_argument("--repeats", type=int, default=3, help="--vs-transformers rounds, the order of the "
                                                          "implementations rotated each round (default 3)")
    g.add_argument("--impls", nargs="+", type=parse_run, default=RUNS, metavar="IMPL[:DTYPE]",
                   help=f"--vs-transformers: the runs to measure, IMPL ({', '.join(IMPLS)}) in DTYPE (fp32, "
                        f"the default, or bf16); transformers bf16, the reference of the ratios, always is "
                        f"(default: {' '.join(RUNS)})")
    g.add_argument("--baseline", metavar="DIR", help="--vs-transformers: also measure the ropelite package in DIR "
                                                     "(e.g. the parent commit, `git archive HEAD~1 ropelite`)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.len = list(dict.fromkeys(args.len))  # each length once: the summary pairs its two rows
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(side_by_side_child(spec) if spec.get("side_by_side") else child(spec)))
        return
    if args.vs_transformers:
        check(args.repeats >= 1 and min(args.len) > 128, "--vs-transformers: --repeats must be >= 1, --len > 128 "
                                                         "(a 128-token warm-up step comes first)")
        side_by_side(args)
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
            est = estimate(config, length, 1, "fp32", grad_ckpt, 1, device="cpu")["total"] / MIB
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
    run_script(main)
