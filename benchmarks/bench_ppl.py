"""Peak memory and speed of eval_ppl's loss path in fp32 and bf16 against a transformers forward with labels, same
tokens.

    python benchmarks/bench_ppl.py                                # SmolLM2 at 2048 and 8192 tokens, three runs
    python benchmarks/bench_ppl.py --lengths 8192 --repeats 3     # best of 3 each, alternating order
    python benchmarks/bench_ppl.py --lengths 4096 --runs ropelite:fp32 transformers:fp32

Each measurement runs in a fresh subprocess, so its peak resident memory (VmHWM, see measure.py: the model's
weights, the activations, the logits) is its own. A run is METHOD:DTYPE:
  ropelite:      ropelite.load + ropelite.ppl.perplexity (what eval_ppl.py runs: hidden states on the fast
                 attention path, logits --chunk-size positions at a time), under torch.no_grad;
  transformers:  LlamaForCausalLM.from_pretrained(..., attn_implementation="sdpa")(ids, labels=ids) under
                 torch.no_grad: full (L, V) logits, then the loss (skipped when transformers is not installed);
the weights and activations in DTYPE (fp32, bf16). The default runs are ropelite fp32 (the exact reference),
ropelite bf16 (what --dtype auto runs on a CPU with native bf16) and transformers bf16.
The tokens are the first L tokens of the longest built-in prose document. Tokens/s counts the loss computation
only (not loading); cpu_s is its CPU time (all threads). Every NLL is kept: runs of the same dtype should agree
to ~1e-4, bf16 and fp32 to ~1e-2. Ratios are taken within the run, best against best at the same length: each
run against ropelite fp32 and against transformers bf16. The CPU may be shared, so timings drift: use
--repeats (alternating order) and read each run's best (a shared CPU only slows a run down).

Outputs in --out (default runs/bench_ppl): bench_ppl.json and bench_ppl.csv (every measurement, with the
ratios), rewritten after each measurement; bench_ppl_summary.json / .csv (the best of each run and length).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ropelite, imported before torch
from ropelite.cli import DTYPES, ArgumentParser, check, run_script  # noqa: E402
from ropelite.io import write_results  # noqa: E402

import numpy as np  # noqa: E402

from measure import has_transformers, peak_rss_mb, rss_mb, run_worker  # noqa: E402

METHODS = ("ropelite", "transformers")
RUNS = ["ropelite:fp32", "ropelite:bf16", "transformers:bf16"]
BASELINES = {"fp32": "ropelite:fp32", "transformers": "transformers:bf16"}  # ratio name -> the run it is against


def measure(method: str, model_name: str, tokens: Path, chunk_size: int, dtype: str) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from ropelite.hub import resolve_model
    torch.set_grad_enabled(False)
    ids = np.load(tokens)
    if method == "ropelite":
        from ropelite.hf import load_model
        from ropelite.ppl import perplexity
        model = load_model(resolve_model(model_name), dtype=DTYPES[dtype])  # weights only, as transformers
        loaded, load_peak = rss_mb(), peak_rss_mb()
        start, cpu_start = time.perf_counter(), time.process_time()
        nll = perplexity(model, [ids], len(ids), chunk_size=chunk_size)["nll"]
    else:
        from transformers import LlamaForCausalLM
        model = LlamaForCausalLM.from_pretrained(resolve_model(model_name), dtype=DTYPES[dtype],
                                                 attn_implementation="sdpa").eval()
        loaded, load_peak = rss_mb(), peak_rss_mb()
        x = torch.from_numpy(ids)[None]                                               # (1, L)
        start, cpu_start = time.perf_counter(), time.process_time()
        nll = float(model(input_ids=x, labels=x).loss)
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    return {"loaded_rss_mb": round(loaded, 1), "load_peak_rss_mb": round(load_peak, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "seconds": round(seconds, 2), "cpu_s": round(cpu_s, 2),
            "tokens_per_s": round(len(ids) / seconds, 1), "nll": nll, "threads": torch.get_num_threads()}


def benchmark_tokens(tokenizer, length: int, folder: Path) -> Path:
    """The first ``length`` tokens of the longest built-in prose document, saved for the workers."""
    from ropelite.data import load_documents, tokenize_documents
    docs = tokenize_documents(load_documents(None, "prose", min_chars=5 * length), tokenizer)
    longest = max(docs, key=len)
    check(len(longest) >= length, f"the longest built-in document has {len(longest)} tokens, fewer than {length}")
    path = folder / f"tokens_{length}.npy"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(path, longest[:length])
    return path


def parse_run(text: str) -> tuple[str, str]:
    """'ropelite:bf16' -> ('ropelite', 'bf16')."""
    method, _, dtype = text.partition(":")
    if method not in METHODS or dtype not in DTYPES:
        raise argparse.ArgumentTypeError(f"not a run: {text!r} (METHOD:DTYPE, METHOD one of {', '.join(METHODS)}, "
                                         f"DTYPE one of {', '.join(DTYPES)})")
    return method, dtype


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="bench_ppl.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), a model folder or a .gguf file")
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192], metavar="L",
                   help="sequence lengths in tokens (default: 2048 8192)")
    p.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(r) for r in RUNS], metavar="METHOD:DTYPE",
                   help=f"what to measure, METHOD ({', '.join(METHODS)}) in DTYPE ({', '.join(DTYPES)}) (default: "
                        f"{' '.join(RUNS)}; transformers runs are skipped when it is not installed)")
    p.add_argument("--chunk-size", type=int, default=512, help="ropelite's logits chunk, as eval_ppl's (default 512)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measurements per run and length, in alternating order; the summary takes each "
                        "run's best (default 1)")
    p.add_argument("--out", default="runs/bench_ppl", help="results folder (default runs/bench_ppl)")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "DTYPE", "TOKENS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        method, dtype, tokens = args.worker
        print(json.dumps(measure(method, args.model, Path(tokens), args.chunk_size, dtype)))
        return
    check(min(args.lengths) >= 2 and args.chunk_size >= 1 and args.repeats >= 1,
          "--lengths must be >= 2, --chunk-size and --repeats >= 1")
    runs = list(dict.fromkeys(f"{m}:{d}" for m, d in args.runs))
    if any(r.startswith("transformers:") for r in runs) and not has_transformers():
        print("bench_ppl: transformers is not installed; measuring ropelite only", file=sys.stderr)
        runs = [r for r in runs if not r.startswith("transformers:")]
    from ropelite.hub import resolve_model
    from ropelite.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(resolve_model(args.model))
    check(tokenizer is not None, f"{args.model} has no tokenizer")
    out, rows = Path(args.out), []
    for length in sorted(set(args.lengths)):
        tokens = benchmark_tokens(tokenizer, length, out)
        for repeat in range(args.repeats):
            # alternate the order, so that a drift in the machine's load does not favour one run
            for run in runs if repeat % 2 == 0 else runs[::-1]:
                method, dtype = run.split(":")
                print(f"bench_ppl: {run} at {length} tokens, repeat {repeat + 1} "
                      f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)
                argv = [__file__, "--model", args.model, "--chunk-size", str(args.chunk_size),
                        "--worker", method, dtype, str(tokens)]
                row = {"run": run, "method": method, "dtype": dtype, "length": length, "repeat": repeat + 1,
                       "chunk_size": args.chunk_size if method == "ropelite" else None,
                       **run_worker(argv, f"{run} at {length}")}
                rows.append(row)
                add_ratios(rows, length)
                write_results(out, "bench_ppl", rows)
                print(f"  peak {row['peak_rss_mb'] / 1024:.2f} GB (loaded {row['loaded_rss_mb'] / 1024:.2f} GB), "
                      f"{row['tokens_per_s']} tokens/s ({row['cpu_s']} s CPU), nll {row['nll']:.5f}", file=sys.stderr)
    summary = [summary_row(rows, run, length) for length in sorted(set(args.lengths)) for run in runs]
    write_results(out, "bench_ppl_summary", summary)
    print("best of each run (highest tokens/s, lowest peak), ratios within the run against ropelite fp32 and "
          "transformers bf16:")
    for r in summary:
        ratios = "  ".join(f"speed x{r[f'speed_vs_{name}']:.2f} vs {BASELINES[name]}"
                           for name in BASELINES if r.get(f"speed_vs_{name}") is not None)
        print(f"{r['run']:<18} L={r['length']:<6} {r['tokens_per_s']:8.1f} tok/s  "
              f"peak {r['peak_rss_mb'] / 1024:6.2f} GB  nll {r['nll']:.5f}  {ratios}")
    print(f"wrote {out / 'bench_ppl.json'}, {out / 'bench_ppl_summary.json'} and .csv")


def best(rows: list[dict], run: str, length: int) -> dict:
    """The run's best measurement at this length: highest tokens/s and lowest peak memory of its repeats
    (a shared CPU only ever slows a run down), and its first NLL."""
    mine = [r for r in rows if r["run"] == run and r["length"] == length]
    return {"nll": mine[0]["nll"], "peak_rss_mb": min(r["peak_rss_mb"] for r in mine),
            "tokens_per_s": max(r["tokens_per_s"] for r in mine), "cpu_s": min(r["cpu_s"] for r in mine),
            "repeats": len(mine)} if mine else {}


def ratios(row: dict, rows: list[dict], length: int) -> dict:
    """``row``'s tokens/s, peak and NLL against each baseline's best at the same length (absent: None)."""
    out = {}
    for name, run in BASELINES.items():
        base = best(rows, run, length)
        out[f"speed_vs_{name}"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3) if base else None
        out[f"peak_vs_{name}"] = round(row["peak_rss_mb"] / base["peak_rss_mb"], 3) if base else None
        out[f"nll_minus_{name}"] = row["nll"] - base["nll"] if base else None
    return out


def add_ratios(rows: list[dict], length: int) -> None:
    """Each measurement of this length against the baselines' best at the same length (same run, same tokens)."""
    for r in rows:
        if r["length"] == length:
            r.update(ratios(r, rows, length))


def summary_row(rows: list[dict], run: str, length: int) -> dict:
    mine = {"run": run, "length": length, **best(rows, run, length)}
    return {**mine, **ratios(mine, rows, length)}


if __name__ == "__main__":
    run_script(main)
