"""The seed paper in miniature: every experiment on one model, and one report with the command behind each.

    python paper.py                           # SmolLM2-135M on CPU (14 min 17 s measured on 2 cores)
    python paper.py --out runs/paper --only ppl needle
    python paper.py --model path/to/llama-2-7b --device cuda --scale paper   # the full-size protocol on a GPU

Pieces (each is one of the project's scripts, run as a separate process, so any piece can be rerun alone with
the command that report.md prints for it):
  bound      analyze.py bound       Men et al.: the smallest base for each context length, beside their table
  freqs      analyze.py freqs       how PI / NTK / YaRN / dynamic / Llama-3 rescale each RoPE dimension
  ppl        eval_ppl.py            perplexity vs length of rope / pi / ntk / yarn / dynamic past the training
                                    length (seed paper Figure 1)
  attention  analyze.py attention   attention distributions at 2K and 8K and their JS divergence from plain
                                    RoPE (Figure 2, Table 1)
  needle     needle.py              needle-in-a-haystack grids with attention entropy (Figure 4), RoPE and YaRN
  train      train.py               a short YaRN finetune: its held-out loss before and after
  ablation   ablation.py            the third finding: NTK / YaRN x8 finetuned at L and at 8L with the same
                                    tokens, on a small LLaMa trained here (Figure 4 e-f; SmolLM2 at --scale paper)

Every script resumes from its own output folder, so a killed paper.py continues where it stopped when run
again with the same --out. The report is rewritten after every piece. It opens with each finding as the script
that measured it states it (the NAME_summary.json files in a piece's folder: title, the paper's claim, the
measured lines, and the differences the claim names as pairs of 95 % intervals), so the summary knows none of the
scripts' result keys. A difference is called "reproduces" only when its two intervals do not overlap
(ropelite.stats.compare); overlapping intervals, or fewer than 3 units, say "cannot tell".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ropelite.cli import ArgumentParser, run_script
from ropelite.errors import RopeliteError
from ropelite.io import (SUMMARY_SUFFIX, atomic_path, lock_out, markdown_table, pivot, read_jsonl, read_summaries,
                         write_json)
from ropelite.stats import Interval, compare
from ropelite.training import latest_checkpoint

HERE = Path(__file__).resolve().parent
PIECES = ("bound", "freqs", "ppl", "attention", "needle", "train", "ablation")


def plan(args) -> list[dict]:
    """The commands, as lists of arguments, and what of their output goes into the report."""
    m = ["--model", args.model, "--device", args.device]
    paper = args.scale == "paper"
    out = Path(args.out)
    # mini: 2K and twice SmolLM2's 8K, where plain RoPE has clearly failed, on 3 documents so that every perplexity
    # has its interval. The 16K forwards are most of the job's time, so the mini run leaves out dynamic NTK (equal
    # to RoPE up to 8K by construction) and PI, which is meant to be finetuned (training-free it is worse than RoPE
    # at every length; the attention piece shows what it does) -- docs/results.md has both, at every length
    ppl_lengths = ["2048", "4096", "8192", "16384", "32768", "65536", "131072"] if paper else ["2048", "16384"]
    ppl_ropes = ["rope", *(["pi"] if paper else []), "ntk", "yarn", *(["dynamic"] if paper else [])]
    needle_lengths = ["1000:131072:32"] if paper else ["2000", "10000"]
    steps = [
        dict(name="bound", title="Men et al. 2024: the base a context length needs",
             argv=["analyze.py", "bound", *([] if paper else ["--lengths", "1024:16384"]), "--out", str(out / "bound")]),
        dict(name="freqs", title="How each variant rescales each RoPE dimension",
             argv=["analyze.py", "freqs", *m, "--rope", "rope", "pi", "ntk", "yarn", "dynamic", "llama3",
                   "--factor", "4", "--out", str(out / "freqs")],
             pivot=("pair", "rope", "scale")),
        dict(name="ppl", title="Perplexity vs context length, training-free (seed paper Figure 1)",
             argv=["eval_ppl.py", *m, "--rope", *ppl_ropes, "--factor", "4",
                   "--lengths", *ppl_lengths, "--docs", "10" if paper else "3", "--out", str(out / "ppl")]),
        dict(name="attention", title="Attention distributions and JS divergence (seed paper Figure 2, Table 1)",
             argv=["analyze.py", "attention", *m, "--rope", "rope", "pi", "ntk", "yarn", "--factor", "4",
                   "--lengths", "2048", "8192", "--samples", "10" if paper else "3", "--out", str(out / "attention")]),
        *[dict(name="needle", key=f"needle-{folder}",
               title=f"Needle in a haystack with attention entropy: {label} (seed paper Figure 4)",
               argv=["needle.py", *m, *rope, "--lengths", *needle_lengths,
                     "--depths", *(["0:100:10"] if paper else ["10", "50", "90"]),
                     "--out", str(out / f"needle-{folder}")])
          for label, folder, rope in (("RoPE", "rope", ["--rope", "rope"]),
                                      ("YaRN x4", "yarn", ["--rope", "yarn", "--factor", "4"]))],
        dict(name="train", title="A short YaRN finetune: held-out loss",
             note=None if paper else (
                 "What a 512-token finetune of a model trained at 8K can show: that the training loop runs, and "
                 "whether the model adapts to YaRN's rescaled slow dimensions and attention temperature at short "
                 "range (its held-out loss, with its interval over the held-out sequences). What it cannot show: "
                 "any gain past the training length, since it never sees a position beyond 512, far inside the 8K "
                 "SmolLM2 already knows; the ablation piece is the experiment about training length."),
             argv=["train.py", *m, "--rope", "yarn", "--factor", "4", "--len", "32768" if paper else "512",
                   # paper scale on the built-in books reads them many times over: bring --data for a real run
                   *(["--epochs-ok"] if paper else ["--tokens", "8192", "--batch-tokens", "1024", "--lr", "5e-5", "--warmup", "2",
                                       "--eval-tokens", "4096", "--eval-every", "4"]),
                   "--out", str(out / "train"),
                   *(["--resume"] if latest_checkpoint(out / "train") else [])]),  # train.py resumes on request only
        dict(name="ablation", title="Token-matched finetuning at L vs 8L: attention entropy and retrieval "
                                    "(seed paper Figure 4 e-f)",
             argv=["ablation.py", "--scale", args.scale, *(m if paper else []), "--out", str(out / "ablation")]),
    ]
    for step in steps:
        step.setdefault("key", step["name"])
    return [s for s in steps if s["name"] in args.only]


def command_line(argv: list[str]) -> str:
    return "python " + " ".join(shlex.quote(a) for a in argv)


def result_tables(folder: Path) -> list[tuple[str, list[dict]]]:
    """Every JSON file in ``folder`` that holds rows: a list of dicts, or a dict with such a list under "rows"
    (settings files hold a plain dict and are skipped)."""
    return [(f.name, rows) for f in sorted(folder.glob("*.json")) if (rows := json_rows(f))]


def json_rows(path: Path) -> list[dict]:
    """The rows a results file holds (a list of dicts, or a dict with one under "rows"); [] for anything else."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = data.get("rows")
    return data if isinstance(data, list) and data and isinstance(data[0], dict) else []


PIECES_FILE = "pieces.json"   # per piece: exit status, seconds, and a fingerprint of the results it left
PRINTED = "printed.txt"        # what the piece printed on stdout: the compact tables the script itself shows
SECTION = "section.md"         # or the tables a piece wrote for the report itself


def out_folder(step: dict) -> Path:
    return Path(step["argv"][step["argv"].index("--out") + 1])


def fingerprint(folder: Path) -> str | None:
    """A hash of a piece's results (JSON, JSONL, CSV), to tell a rerun that added nothing from one that did. The
    summaries are left out: they are made from the results, so a rerun that only rewrote one measured nothing."""
    files = sorted(f for pattern in ("*.json", "*.jsonl", "*.csv") for f in folder.glob(pattern)
                   if not f.name.endswith(SUMMARY_SUFFIX))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def run_piece(step: dict) -> tuple[int, float]:
    """Run one piece as its own process, echoing its stdout and keeping it in the piece's folder."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, str(HERE / step["argv"][0]), *step["argv"][1:]],
                            stdout=subprocess.PIPE, text=True)
    printed = []
    for line in proc.stdout:
        sys.stdout.write(line)
        printed.append(line)
    code = proc.wait()
    folder = out_folder(step)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / PRINTED) as tmp:
        tmp.write_text("".join(printed))
    return code, time.time() - start


def record(pieces: dict, step: dict, code: int, seconds: float) -> None:
    """Keep the time of the run that produced the results: a rerun that only found them done keeps the old one."""
    before = pieces.get(step["key"], {})
    now = fingerprint(out_folder(step))
    if code == 0 and before.get("code") == 0 and before.get("fingerprint") == now:
        pieces[step["key"]] = {**before, "rerun_seconds": round(seconds, 1)}
    else:
        pieces[step["key"]] = {"code": code, "seconds": round(seconds, 1), "fingerprint": now}


def status_line(piece: dict | None) -> str:
    if piece is None:
        return "Not run yet."
    if piece["code"]:
        return f"**Failed** with exit status {piece['code']} after {piece['seconds']:.0f} s; see the console output."
    line = f"Finished in {piece['seconds']:.0f} s."
    if "rerun_seconds" in piece:
        line += f" (A later rerun found everything done in {piece['rerun_seconds']:.0f} s.)"
    return line


def piece_section(out: Path, step: dict, piece: dict | None) -> str:
    """One piece: its command, status, the table it printed, pivots, figures and links to the full results."""
    folder = out_folder(step)
    parts = [f"## {step['title']}\n\n```\n{command_line(step['argv'])}\n```\n\n{status_line(piece)}\n"]
    if step.get("note"):
        parts.append(step["note"] + "\n")
    if not folder.is_dir():
        return "\n".join(parts)
    if (folder / SECTION).is_file():  # a piece that writes its own tables (ablation.py) prints only a summary
        parts.append((folder / SECTION).read_text())
    elif (folder / PRINTED).is_file() and (folder / PRINTED).read_text().strip():
        parts.append("What it printed:\n\n```\n" + (folder / PRINTED).read_text().rstrip() + "\n```\n")
    if "pivot" in step:
        index, column, value = step["pivot"]
        for name, rows in result_tables(folder):
            parts.append(f"`{name}`, {value} by {index} and {column}:\n\n"
                         + markdown_table(pivot(rows, index, column, value)))
    for png in sorted(folder.glob("*.png")):
        parts.append(f"![{png.name}]({png.relative_to(out).as_posix()})\n")
    for log in sorted(folder.glob("eval.jsonl")):  # train.py's held-out loss: a few rows
        parts.append(f"`{log.name}`:\n\n" + markdown_table(read_jsonl(log)))
    links = [f"[{f.name}]({f.relative_to(out).as_posix()})" for pattern in ("*.csv", "*.jsonl")
             for f in sorted(folder.glob(pattern))]
    if links:
        parts.append("Every row: " + ", ".join(links) + ".\n")
    return "\n".join(parts)


VERDICTS = {"reproduces": "reproduces", "against": "goes against the paper",
            "overlap": "cannot tell: the 95 % intervals overlap", "unknown": "cannot tell: fewer than 3 units, no interval"}


def verdict(comparison: dict) -> str:
    """One of a summary's comparisons ({claim, expected: 'higher' or 'lower', a, b: each an Interval's fields and a
    label}) judged by ``stats.compare``: it reproduces only when the two 95 % intervals do not overlap and a
    stands to b as claimed."""
    a, b = (Interval(**{k: comparison[side][k] for k in ("estimate", "low", "high", "n", "method")}) for side in "ab")
    found = compare(a, b)
    key = found if found in ("overlap", "unknown") else "reproduces" if found == comparison["expected"] else "against"
    return (f"{comparison['claim']}: **{VERDICTS[key]}** ({comparison['a']['label']} {a.text('.4g')} vs "
            f"{comparison['b']['label']} {b.text('.4g')}).")


def summary(steps: list[dict]) -> list[str]:
    """Each finding as the script that measured it wrote it (``write_summary``, one ``*_summary.json`` per results
    file in a piece's folder): its title, the paper's claim, the measured lines, each number with its n and its
    interval where there are 3 units or more, then a verdict on each difference the claim names (the summary's
    numbers["comparisons"], ``verdict``)."""
    lines = []
    for step in steps:
        folder = out_folder(step)
        for found in read_summaries(folder) if folder.is_dir() else []:
            lines += [f"### {found['title']}", "", f"Paper: {found['claim']}", "", "Measured here:", "",
                      *[f"- {line}" for line in found["finding"]], ""]
            comparisons = found["numbers"].get("comparisons") or []
            if comparisons:
                lines += ["Verdict (\"reproduces\" only where the 95 % intervals separate):", "",
                          *[f"- {verdict(c)}" for c in comparisons], ""]
    if lines:
        lines += ["Caveats: everything but the train and ablation pieces is training-free (the paper finetunes); "
                  "\"ntk x4\" is the NTK-aware base b s^(d/(d-2)), \"ntk base B\" a fixed new base as the paper's "
                  "1e4 -> 1e6; the mini run uses few documents and samples: read each number with its n and, from "
                  "n = 3 on, its 95 % interval; a difference whose intervals overlap is one the data cannot tell."]
    return lines


def write_report(out: Path, steps: list[dict], pieces: dict) -> Path:
    parts = ["# ropelite: the seed paper in miniature\n",
             "Made by `" + command_line(["paper.py", *sys.argv[1:]]) + "`. Each section gives the exact command "
             "that produced it; run it alone to redo that piece.\n"]
    found = summary(steps)
    if found:
        parts.append("## Summary: what each finding looks like here, beside the paper's claim\n\n"
                     + "\n".join(found) + "\n")
    parts += [piece_section(out, step, pieces.get(step["key"])) for step in steps]
    report = out / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(parts))
    return report


def main(argv=None) -> None:
    p = ArgumentParser(prog="paper.py", description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (default), a Hugging Face LLaMa folder, or a .gguf file")
    p.add_argument("--device", default="cpu", help="torch device for every piece (default cpu)")
    p.add_argument("--scale", choices=("mini", "paper"), default="mini",
                   help="mini: sizes that finish in about 15 minutes on 2 CPU cores (default); paper: the seed "
                        "paper's lengths, samples, needle grid and a 32K finetune, for a GPU")
    p.add_argument("--only", nargs="+", choices=PIECES, default=list(PIECES), metavar="PIECE",
                   help=f"run only these pieces: {', '.join(PIECES)} (default: all)")
    p.add_argument("--out", default="runs/paper", help="run folder: one sub-folder per piece and report.md")
    args = p.parse_args(argv)
    out = lock_out(args.out)
    steps = plan(args)
    pieces = json.loads((out / PIECES_FILE).read_text()) if (out / PIECES_FILE).is_file() else {}
    report = write_report(out, steps, pieces)
    for step in steps:
        print(f"\n=== {step['title']}\n{command_line(step['argv'])}", flush=True)
        record(pieces, step, *run_piece(step))
        write_json(out / PIECES_FILE, pieces)
        report = write_report(out, steps, pieces)
    print(f"\nreport: {report}")
    failed = [s["key"] for s in steps if pieces[s["key"]]["code"]]
    if failed:
        raise RopeliteError(f"pieces that failed: {', '.join(failed)} (the report says which; rerun to resume)")


if __name__ == "__main__":
    run_script(main)
