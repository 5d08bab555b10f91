"""Training speed of the ablation's miniature with torch's threads waiting by spinning or passively, alone and
beside other busy jobs on the same cores.

    python benchmarks/bench_threads.py                          # 2 rounds: alone and beside one busy job
    python benchmarks/bench_threads.py --busy 0 1 2 --steps 60 --repeats 3 --dtype bf16

The model and step are the ablation's pretraining (ablation.py, Mini): 2 blocks, hidden 128, 4 heads (4 KV
heads), SwiGLU 384, vocabulary 2000, 16 rows of 128 tokens per step, train.py's optimizer step (AdamW, clip 1),
random tokens. Each measurement is a fresh process, so that libgomp reads its environment anew; it runs --steps
steps after 3 warm-up steps, with one of these thread settings:

    spin      torch's default (one thread per core), imported before ropelite, so libgomp keeps its default of
              spinning at every barrier: the behaviour before ropelite asked for passive waiting
    passive   the same thread count, ropelite imported first: OMP_WAIT_POLICY=PASSIVE with GOMP_SPINCOUNT=3000
              (ropelite/__init__.py: a short spin, then sleep), what every script runs now
              (ropelite.cli.set_threads keeps all cores then)
    1-thread  one thread: nothing to wait for

--busy N starts N single-thread busy loops (``python -c "while True: pass"``) on the cores before the
measurement and stops them after it: another job on a shared machine. Reported per (setting, busy): tokens/s of
the whole timed stretch (wall clock), its CPU time (all threads of the measured process: spinning shows up here),
and the best of the rounds; ratios within the run: each setting beside N busy jobs against the same setting
alone, and passive against spin under the same load. The machine's other load is noted (load average) with each
row: on a shared machine the alone rows are not alone. Results: bench_threads.json and .csv in --out.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ropelite (imported later: see child)
sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = ("spin", "passive", "1-thread")


def child(spec: dict) -> dict:
    """One measurement, in this fresh process; ``spec['setting']`` decides the import order (see above)."""
    if spec["setting"] == "spin":
        import torch  # noqa: F401  (first: libgomp loads with its default wait policy)
    import os

    from ropelite.cli import DTYPES, waits_passively  # ropelite (then torch), unless torch came first above
    import torch
    from ropelite.model import LlamaConfig
    from ropelite.parallel import make_optimizer
    from ropelite.rope import RopeConfig
    from ropelite.trainer import optimizer_step
    from ropelite.training import random_model
    if spec["setting"] == "1-thread":
        torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=2000, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                         rope=RopeConfig(theta=1e4, original_max_position_embeddings=128))
    model = random_model(config, seed=0).train()
    optimizer = make_optimizer(model, 1e-3, (0.9, 0.95), 0.0, torch.device("cpu"))
    rows, length, warmup = 16, 128, 3
    ids = torch.randint(0, config.vocab_size, (warmup + spec["steps"], rows, length),
                        generator=torch.Generator().manual_seed(0))
    dtype = DTYPES[spec["dtype"]]
    for step in range(warmup + spec["steps"]):
        if step == warmup:
            start, cpu_start = time.perf_counter(), time.process_time()
        optimizer_step(model, optimizer, [(ids[step],)], 1e-3, rows * (length - 1), dtype=dtype, clip=1.0)
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    return {"threads": torch.get_num_threads(), "passive": waits_passively(),
            "wait_policy": os.environ.get("OMP_WAIT_POLICY"), "spin_count": os.environ.get("GOMP_SPINCOUNT"),
            "seconds": round(seconds, 2),
            "cpu_s": round(cpu_s, 2), "tokens_per_s": round(spec["steps"] * rows * length / seconds, 1)}


def main() -> None:
    import argparse
    import os
    import subprocess

    from measure import run_worker
    from ropelite.cli import ArgumentParser, check
    from ropelite.io import write_results

    p = ArgumentParser(prog="bench_threads.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1],
                   help="numbers of single-thread busy jobs beside the measurement (default: 0 1)")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                   help="thread settings to measure (default: all)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per measurement (default 30)")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds, each measuring every (setting, busy) once in rotated order; the best is kept "
                        "(default 2)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="compute dtype of the step (default fp32, what the ablation runs)")
    p.add_argument("--out", default="runs/bench_threads", help="results folder (default runs/bench_threads)")
    args = p.parse_args()
    check(args.steps >= 1 and args.repeats >= 1 and min(args.busy) >= 0, "--steps, --repeats >= 1, --busy >= 0")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    cells = [(setting, busy) for busy in dict.fromkeys(args.busy) for setting in dict.fromkeys(args.settings)]
    rows = []
    for r in range(args.repeats):
        for setting, busy in cells[r % len(cells):] + cells[:r % len(cells)]:
            loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                time.sleep(0.5 if busy else 0)   # the busy jobs are running before the measurement starts
                spec = {"setting": setting, "steps": args.steps, "dtype": args.dtype}
                row = {"round": r + 1, "setting": setting, "busy": busy, "dtype": args.dtype,
                       "load_before": round(os.getloadavg()[0], 2),
                       **run_worker([__file__, "--child", json.dumps(spec)], f"{setting} beside {busy}", env=env)}
            finally:
                for loop in loops:
                    loop.kill()
                    loop.wait()
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_results(args.out, "bench_threads", rows)
    best = {}
    for row in rows:
        key = (row["setting"], row["busy"])
        if key not in best or row["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = row
    summary = []
    for (setting, busy), row in best.items():
        alone, spin = best.get((setting, 0)), best.get(("spin", busy))
        summary.append({"setting": setting, "busy": busy, "threads": row["threads"], "passive": row["passive"],
                        "tokens_per_s": row["tokens_per_s"], "cpu_s": row["cpu_s"],
                        "rounds": sum(1 for x in rows if (x["setting"], x["busy"]) == (setting, busy)),
                        "vs_alone": alone and round(row["tokens_per_s"] / alone["tokens_per_s"], 3),
                        "vs_spin": spin and round(row["tokens_per_s"] / spin["tokens_per_s"], 3)})
    write_results(args.out, "bench_threads_summary", summary)
    print(f"best of {args.repeats} round(s), {args.steps} steps of 16 x 128 tokens, {args.dtype}:")
    for s in summary:
        print(f"  {s['setting']:>8} ({s['threads']} threads{', passive' if s['passive'] else ''}) beside {s['busy']} "
              f"busy: {s['tokens_per_s']:8.0f} tokens/s, {s['cpu_s']:6.2f} s CPU; vs alone x{s['vs_alone']}, "
              f"vs spin x{s['vs_spin']}")
    print(f"wrote {args.out}/bench_threads.json, _summary.json and .csv")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:   # no ropelite import before child() chooses the order
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        from ropelite.cli import run_script
        run_script(main)
