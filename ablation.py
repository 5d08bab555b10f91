"""The seed paper's third finding, token-matched finetuning at L vs 8L (Zhong et al. 2024, Figure 4 e-f), as one run.

    python ablation.py                              # the miniature on a CPU -> runs/ablation
    python ablation.py --workers 1                  # everything in this process, a progress bar per model
    python ablation.py --dtype fp32                 # fp32 throughout (default auto: bf16 where the CPU has it)
    python ablation.py --scale paper --device cuda  # SmolLM2 (trained at 8K): finetunes at 8K and 32K, grids to 64K
    python ablation.py --scale paper --dry-run      # print the paper-scale commands and stop

mini (no short-context LLaMa exists offline, so it trains its own; ropelite.ablation_pipeline runs it):
  1. the built-in books, prose and code split so that nothing held out was trained on (at most 1 % of any
     held-out window's 12-word runs occur verbatim in the training text; overlapping pydoc topics and modules
     are held out or trained on as whole groups, each book's tail is cut at a line break), a sentencepiece
     tokenizer.model (LLaMa-2 style) on the training text, then a 2-layer LLaMa pretrained from scratch at
     L = 128 with plain RoPE, on text plus passkey documents (the evaluation's own prompt, answer tokens
     weighted x10, a curriculum on their length) and copy rows;
  2. two finetuning streams, each built ONCE per finetune seed and cut into rows of L or of 8L, so the two arms
     consume the same tokens in the same order with the same loss weights: "mixed" (text, passkey documents of
     at most L tokens, copy blocks; seeds 1, 2, 3) and "text" (text only; seed 1). NTK (b' = b s^(d/(d-2)))
     and YaRN at s = 8 are finetuned at L and at 8L on each: 16 finetunes, same steps, schedule and tokens
     per step (8L takes 1/8 the rows);
  3. every model (pretrained, the two training-free extensions, the finetunes) on the same held-out windows:
     perplexity at L..16L (truncate protocol, and the last L tokens of each length), the last query's attention
     entropy, and needle.py's passkey grid (ropelite.haystack's cells; the same 10 keys x 3 depths per length
     for every model) with Algorithm 1's entropy per trial;
  4. every number as its mean and 95 % interval (Wilson for pass rates, pooled over seeds; a seeded bootstrap
     over seeds and windows or trials for the rest), a verdict per claim and per length from the intervals,
     figures with the intervals, section.md and ablation_summary.json.
paper: the same pipeline with the project's scripts (train.py, eval_ppl.py, needle.py) on SmolLM2: NTK base
  1e5 -> 1e6 and YaRN x4, finetunes at 8K and 32K with 20M tokens each, passkey and needle grids to 64K.

Each stage writes its folder or file atomically, and a rerun with the same --out skips what is finished (a
trained model folder is never retrained; a model's passkey grid goes on from its first cell not done).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import ropelite  # noqa: F401  (before torch, so that OpenMP waits passively: ropelite/__init__.py)
import torch

from ropelite.ablation_pipeline import Clock, run_mini
from ropelite.cli import AUTO, ArgumentParser, check, resolve_dtype, run_script
from ropelite.io import lock_out
from ropelite.training import latest_checkpoint

HERE = Path(__file__).resolve().parent
WORKERS = min(2, os.cpu_count() or 1)
PAPER_ROPES = {"ntk": ["--rope", "ntk", "--base", "1e6"], "yarn": ["--rope", "yarn", "--factor", "4"]}
PAPER_LENGTHS = ["4096", "8192", "16384", "32768", "65536"]


def paper_commands(args) -> list[list[str]]:
    """The paper-scale run as the project's scripts: 4 token-matched finetunes (train.py), then perplexity
    (eval_ppl.py) and the passkey and needle grids (needle.py) of the base, the training-free extensions and
    the finetunes."""
    out, m = Path(args.out), ["--model", args.model, "--device", args.device]
    data = ["--data", *args.data] if args.data else ["--epochs-ok"]
    commands = []
    for rope, flags in PAPER_ROPES.items():
        for length in ("8192", "32768"):
            folder = out / f"{rope}-{length}"
            commands.append(["train.py", *m, *flags, "--len", length, "--tokens", "20971520", "--batch-tokens",
                             "262144", *data, "--out", str(folder), *(["--resume"] if latest_checkpoint(folder) else [])])
    evaluated = [("rope", m + ["--rope", "rope"]), *[(f"{r}-free", m + f) for r, f in PAPER_ROPES.items()],
                 *[(f"{r}-{n}", ["--model", str(out / f"{r}-{n}"), "--device", args.device])
                   for r in PAPER_ROPES for n in ("8192", "32768")]]
    for name, model in evaluated:
        commands.append(["eval_ppl.py", *model, "--lengths", *PAPER_LENGTHS, "--docs", "10", "--out", str(out / "ppl" / name)])
        commands.append(["needle.py", *model, "--task", "passkey", "--no-chat", "--lengths", *PAPER_LENGTHS,
                         "--depths", "0:100:5", "--trials", "5", "--out", str(out / "passkey" / name)])
        commands.append(["needle.py", *model, "--lengths", "4000:65536:16", "--depths", "0:100:10",
                         "--out", str(out / "needle" / name)])
    return commands


def run_paper(args) -> None:
    """Each command in its own process; the scripts resume from their folders (train.py on --resume)."""
    for argv in paper_commands(args):
        print("python " + " ".join(argv), flush=True)
        if args.dry_run:
            continue
        code = subprocess.call([sys.executable, str(HERE / argv[0]), *argv[1:]])
        check(code == 0, f"{argv[0]} failed with exit status {code}; rerun the same command to resume")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="ablation.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=("mini", "paper"), default="mini",
                   help="mini: train a small LLaMa of our own at L = 128 and run everything on a CPU (default); "
                        "paper: SmolLM2 finetuned at 8K and 32K with train.py, for a GPU")
    p.add_argument("--model", default="smollm2",
                   help="--scale paper: the pretrained model to extend (default smollm2); mini trains its own")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="--scale paper: the finetuning text for train.py (default: the built-in books, read "
                        "many times over)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; mini runs on cpu)")
    p.add_argument("--workers", type=int, default=WORKERS,
                   help="mini: processes that run the 19 independent finetunes and evaluations side by side, "
                        f"after the pretraining (default {WORKERS}: min(2, this machine's cores); 1 runs them in "
                        "this process, with a progress bar each)")
    p.add_argument("--threads", type=int, default=None,
                   help="mini: torch threads of the pretraining and of each worker (default: the pretraining takes "
                        "the threads every script takes, ropelite.cli.set_threads: all cores, waiting passively, "
                        "so another job costs its share; each worker takes cores / --workers)")
    p.add_argument("--dtype", choices=(AUTO, "fp32", "bf16"), default=AUTO,
                   help="mini: auto (default: bf16 on a CPU that multiplies bf16 natively, AMX or AVX512-BF16, "
                        "else fp32; ropelite.cli.resolve_dtype), fp32, or bf16: training under bf16 autocast over "
                        "fp32 weights and AdamW, evaluation with bf16 weights (the loss's softmax, the perplexity's "
                        "log-sum-exp, the RoPE angles and the entropies in fp32); the resolved dtype is recorded")
    p.add_argument("--out", default="runs/ablation", help="run folder; a rerun skips finished stages "
                                                          "(default runs/ablation)")
    p.add_argument("--dry-run", action="store_true", help="--scale paper: print the commands and stop")
    args = p.parse_args(argv)
    check(args.workers >= 1, "--workers must be at least 1")
    check(args.threads is None or args.threads >= 1, "--threads must be at least 1")
    check(args.scale == "paper" or args.device == "cpu", "--scale mini runs on the cpu (it is sized for one)")
    check(args.scale == "paper" or not args.dry_run, "--dry-run is for --scale paper")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.scale == "paper":
        if not args.dry_run:
            lock_out(args.out)
        run_paper(args)
        return
    out = lock_out(args.out)
    dtype = resolve_dtype(args.dtype, "cpu", log=lambda line: print(line, file=sys.stderr))
    if args.threads:
        torch.set_num_threads(args.threads)
    worker_threads = args.threads or max(1, torch.get_num_threads() // args.workers)
    clock = Clock()
    lines = run_mini(out, workers=args.workers, threads=worker_threads, dtype=dtype)
    print((out / "section.md").read_text())
    print("finding:\n" + "\n".join(lines) + f"\n({clock.read()} for this run; results in {out})")


if __name__ == "__main__":
    run_script(main)
