"""Peak memory and speed of eval_ppl's loss path against a transformers forward with labels, same tokens.

    python benchmarks/bench_ppl.py                                # SmolLM2, 8192 and 16384 tokens
    python benchmarks/bench_ppl.py --lengths 4096 --methods ropelite

Each measurement runs in a fresh subprocess, so its peak resident memory (resource.getrusage ru_maxrss: the
model's weights, the activations, the logits) is its own:
  ropelite:      ropelite.load + ropelite.ppl.perplexity (what eval_ppl.py runs: hidden states on the fast
                 attention path, logits --chunk-size positions at a time), under torch.no_grad;
  transformers:  LlamaForCausalLM.from_pretrained(..., attn_implementation="sdpa")(ids, labels=ids) under
                 torch.no_grad: full (L, V) logits, then the loss (skipped when transformers is not installed).
The tokens are the first L tokens of the longest built-in prose document. Tokens/s counts the loss computation
only (not loading). Both NLLs are kept: they should agree to ~1e-4, a check that the two compute the same thing.
Ratios are against transformers' best measured in the same run; the CPU may be shared, so timings drift: use
--repeats (alternating order) and read each method's best.

Outputs in --out (default runs/bench_ppl): bench_ppl.json and bench_ppl.csv, rewritten after each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from measure import has_transformers, peak_rss_mb, rss_mb, run_worker
from ropelite.cli import ArgumentParser, DTYPES, check, run_script
from ropelite.io import write_results

METHODS = ("ropelite", "transformers")


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
        start = time.perf_counter()
        nll = perplexity(model, [ids], len(ids), chunk_size=chunk_size)["nll"]
    else:
        from transformers import LlamaForCausalLM
        model = LlamaForCausalLM.from_pretrained(resolve_model(model_name), dtype=DTYPES[dtype],
                                                 attn_implementation="sdpa").eval()
        loaded, load_peak = rss_mb(), peak_rss_mb()
        x = torch.from_numpy(ids)[None]                                               # (1, L)
        start = time.perf_counter()
        nll = float(model(input_ids=x, labels=x).loss)
    seconds = time.perf_counter() - start
    return {"loaded_rss_mb": round(loaded, 1), "load_peak_rss_mb": round(load_peak, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "seconds": round(seconds, 2),
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


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="bench_ppl.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), a model folder or a .gguf file")
    p.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384], metavar="L",
                   help="sequence lengths in tokens (default: 8192 16384)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="what to measure (default: both; transformers is skipped when not installed)")
    p.add_argument("--chunk-size", type=int, default=512, help="ropelite's logits chunk, as eval_ppl's (default 512)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="weights and activations (default fp32)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measurements per method and length, in alternating order; the summary takes each "
                        "method's best (default 1)")
    p.add_argument("--out", default="runs/bench_ppl", help="results folder (default runs/bench_ppl)")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "TOKENS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker[0], args.model, Path(args.worker[1]), args.chunk_size, args.dtype)))
        return
    check(min(args.lengths) >= 2 and args.chunk_size >= 1 and args.repeats >= 1,
          "--lengths must be >= 2, --chunk-size and --repeats >= 1")
    methods = list(dict.fromkeys(args.methods))
    if "transformers" in methods and not has_transformers():
        print("bench_ppl: transformers is not installed; measuring ropelite only", file=sys.stderr)
        methods.remove("transformers")
    from ropelite.hub import resolve_model
    from ropelite.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(resolve_model(args.model))
    check(tokenizer is not None, f"{args.model} has no tokenizer")
    out, rows = Path(args.out), []
    for length in sorted(set(args.lengths)):
        tokens = benchmark_tokens(tokenizer, length, out)
        for repeat in range(args.repeats):
            # alternate the order, so that a drift in the machine's load does not favour one method
            for method in methods if repeat % 2 == 0 else methods[::-1]:
                print(f"bench_ppl: {method} at {length} tokens, repeat {repeat + 1} "
                      f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)
                argv = [__file__, "--model", args.model, "--chunk-size", str(args.chunk_size),
                        "--dtype", args.dtype, "--worker", method, str(tokens)]
                row = {"method": method, "length": length, "repeat": repeat + 1, "dtype": args.dtype,
                       "chunk_size": args.chunk_size if method == "ropelite" else None,
                       **run_worker(argv, f"{method} at {length}")}
                rows.append(row)
                add_ratios(rows, length)
                write_results(out, "bench_ppl", rows)
                print(f"  peak {row['peak_rss_mb'] / 1024:.2f} GB (loaded {row['loaded_rss_mb'] / 1024:.2f} GB), "
                      f"{row['tokens_per_s']} tokens/s, nll {row['nll']:.5f}", file=sys.stderr)
    print("best of each method (lowest peak, highest tokens/s), against transformers' best:")
    for length in sorted(set(args.lengths)):
        base = best(rows, "transformers", length)
        for method in methods:
            r = best(rows, method, length)
            print(f"{method:<13} L={length:<6} peak {r['peak_rss_mb'] / 1024:6.2f} GB  {r['tokens_per_s']:8.1f} tok/s"
                  f"  nll {r['nll']:.5f}" + (f"  memory x{r['peak_rss_mb'] / base['peak_rss_mb']:.3f}, speed "
                                             f"x{r['tokens_per_s'] / base['tokens_per_s']:.3f}" if base else ""))

def best(rows: list[dict], method: str, length: int) -> dict:
    """The method's best measurement at this length: lowest peak memory and highest tokens/s of its repeats
    (a shared CPU only ever slows a run down)."""
    mine = [r for r in rows if r["method"] == method and r["length"] == length]
    return {"nll": mine[0]["nll"], "peak_rss_mb": min(r["peak_rss_mb"] for r in mine),
            "tokens_per_s": max(r["tokens_per_s"] for r in mine)} if mine else {}


def add_ratios(rows: list[dict], length: int) -> None:
    """Each row of this length against transformers' best at the same length (same run, same tokens)."""
    base = best(rows, "transformers", length)
    if not base:
        return
    for r in rows:
        if r["length"] == length:
            r["peak_vs_transformers"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 3)
            r["speed_vs_transformers"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            r["nll_minus_transformers"] = r["nll"] - base["nll"]

if __name__ == "__main__":
    run_script(main)
