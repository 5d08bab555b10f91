"""Needle in a haystack or passkey retrieval with attention entropy per cell: the seed paper's Figure 4, Algorithm 1.

    python needle.py                                         # small CPU grid: SmolLM2, 3 lengths x 5 depths
    python needle.py --rope yarn --factor 4 --lengths 1000 8000 16000 --depths 0 50 100
    python needle.py --lengths 1000:131072:32 --depths 0:100:10   # the paper's grid (round(linspace(...)))
    python needle.py --task passkey --lengths 1000 2000 4000 --depths 0 50 100 --trials 5

Protocol (ropelite.haystack holds it as library code, with needle_cell and passkey_cell for one cell each). For
each context length L and depth d %:
  1. the haystack is cut to the tokens that fit in L once the template, question, needle and --max-new-tokens
     answer tokens are counted, and cut back to a sentence end. Haystack (--haystack): --task needle takes the
     built-in books (ropelite.books) by default, --task passkey the filler "The grass is green. ..." repeated;
     either takes files or a built-in corpus by name. From documents the sample rule picks the text: the first
     document long enough for the longest context, from its start; when none is, the documents in order,
     repeated. Each row records the corpus and the (document, token offset, tokens) pieces its context used;
  2. the needle (or the pass-key line) goes in at d % of that context, moved back to the nearest sentence
     boundary before it (a token ending in . ! or ? followed by one starting with whitespace; the context start
     counts, where a newline separates the needle from the first sentence);
  3. the prompt: needle, inside the model's chat template when the tokenizer has one (Fu et al. on instruct
     models); passkey, plain text (the passkey protocol of landmark attention, YaRN and LongLoRA: inside an
     instruct template SmolLM2 explains the phrase instead of retrieving the key); --chat / --no-chat choose. The
     answer is primed with --answer-prefix ("The pass key is" for passkey); the model decodes greedily with the
     KV cache, up to --max-new-tokens tokens (needle 32, passkey 10);
  4. scoring. needle: the answer words are the needle's words after the answer prefix, minus stop words
     (default: eat sandwich sit dolores park sunny day), lower-cased with punctuation stripped; a cell passes
     when the answer contains at least --pass-recall (default 0.5) of them. passkey (landmark attention, YaRN,
     LongLoRA): --trials keys K per cell, 5-digit, deterministic from (--seed, length, depth, trial) and distinct;
     a trial passes when the first integer in the answer equals K; the cell's pass rate is over its trials,
     with its Wilson 95 % interval (pass_rate_low, pass_rate_high, pass_rate_n; null below 3 trials, so a needle
     cell, one trial, has none). Raw answers are kept;
  5. attention entropy (seed paper Appendix C, Algorithm 1): the prompt is prefilled on the fast path; for
     every generated token, the entropy -sum p ln p (nats) of its own attention row, per layer and head,
     averaged over heads, then layers, then generated tokens (then trials, with the standard error over them:
     entropy_se, entropy_n; null below 3). Per-layer means are kept too.

Outputs in --out (default runs/needle): TASK.json and TASK.csv (TASK = needle or passkey; one row per cell,
rewritten atomically after every cell), TASK_settings.json (what each settings id means), TASK_summary.json (this
run's grid beside the literature's claim: trials passed with 95 % Wilson intervals, overall and on each side of
the training length; per length the pooled pass rate with its interval, the mean entropy with its standard error
over cells and the entropy of failing and passing trials; and the entropy of failing against passing trials
over every length, with bootstrap intervals and every length where it goes the other way) and
TASK_<rope>_<id>.png, the heatmap (x = length, y = depth; needle: blue = pass, orange = fail; passkey: pass
rate on a blue-orange scale and k/n trials passed; grey = not run; mean entropy in nats in each cell; under the
grid a strip of the pass rate per length with its Wilson interval as a bar; dashed line at the training
length: --train-len, else the length a ropelite-finetuned model records in its config.json, else the RoPE's
original_max_position_embeddings). The printed table is the heatmap as text, with the per-length rows under it.
The heatmap shows every cell run with these settings in --out, so grids run
one after another add up. Running again with the same --out skips the cells already done with the same
settings, so a killed run resumes; rows of other settings (another --rope, say) stay and get their own heatmap.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

from ropelite.cli import (GRID_HELP, ArgumentParser, add_model_args, check, load_for, parse_grid,
                          resolve_factor, rope_overrides, run_script, token_bar)
from ropelite.data import KINDS
from ropelite.haystack import (ANSWER_PREFIX, DEFAULT_HAYSTACK, FILLER, MAX_NEW_TOKENS, NEEDLE, NEEDLE_TEMPLATE,
                               PASSKEY_LINE, PASSKEY_PREFIX, PASSKEY_QUESTION, PASSKEY_TEMPLATE, QUESTION, STOP_WORDS,
                               TASKS, answer_words, build_haystack, cell_intervals, draw_heatmaps, grid_findings, haystack_maker,
                               needle_cell, passkey_cell, passkey_haystack, passkeys, text_grid)
from ropelite.hf import read_config, trained_length
from ropelite.hub import resolve_model
from ropelite.io import lock_out, read_rows, record_settings, settings_id, write_results, write_summary

NEEDLE_ONLY = ("needle", "question", "answer_prefix", "answer", "pass_recall")
CLAIMS = {  # what the literature says each grid shows, beside which the summary puts the measured numbers
    "needle": ("Zhong et al. 2024, §4 and Figure 4: RoPE extensions pass more needle tests than RoPE, but \"as the "
               "context length increases, some tests fail ... Eventually, almost all fail in extremely long "
               "contexts\"; \"the locations of needle retrieval errors often coincide with high attention "
               "entropy\""),
    "passkey": ("landmark attention, YaRN and LongLoRA: an extended model retrieves the pass key across the context "
                "it was extended to; Zhong et al. 2024 (Figure 4) tie retrieval failures to high attention entropy"),
}
TITLES = {"needle": "Needle in a haystack", "passkey": "Passkey retrieval"}


# ----------------------------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="needle.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("grid")
    g.add_argument("--lengths", nargs="+", default=["1000", "2000", "4000"], metavar="N",
                   help=f"context lengths in tokens (prompt + answer), {GRID_HELP}; the paper: 1000:131072:32 "
                        "(default: 1000 2000 4000)")
    g.add_argument("--depths", nargs="+", default=["0", "25", "50", "75", "100"], metavar="D",
                   help=f"needle depths in percent of the context, {GRID_HELP}; fractions allowed; the paper: "
                        "0:100:10 (default: 0 25 50 75 100)")
    t = p.add_argument_group("test")
    t.add_argument("--task", default="needle", choices=TASKS,
                   help="needle: Fu et al.'s needle in a haystack (the seed paper's); passkey: the pass-key "
                        "retrieval of landmark attention / YaRN / LongLoRA, which base models take (default needle)")
    t.add_argument("--haystack", nargs="+", default=None, metavar="PATH",
                   help="text / .jsonl / .npy / .bin files or folders, in order, or one built-in name: "
                        f"{', '.join(KINDS)} (ropelite.data) or filler (\"{FILLER}\" repeated) (default: books for "
                        "needle, filler for passkey)")
    t.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="ask inside the tokenizer's chat template (--chat) or in plain text (--no-chat). Default: "
                        "needle uses the template when the tokenizer has one, as Fu et al. do for instruct models; "
                        "passkey uses plain text, as the passkey protocol of landmark attention, YaRN and LongLoRA "
                        "does (inside SmolLM2's template the model explains the phrase \"the pass key\" instead of "
                        "retrieving the key, so the template would measure the template, not the context)")
    t.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy answer length limit (default: 32 for needle, 10 for passkey)")
    k = p.add_argument_group("passkey")
    k.add_argument("--trials", type=int, default=5, help="keys per cell (default 5; YaRN runs 10-20)")
    k.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    n = p.add_argument_group("needle")
    n.add_argument("--needle", default=None, help=f"the sentence to hide (default: '{NEEDLE}')")
    n.add_argument("--question", default=None, help=f"the question asked after the context (default: '{QUESTION}')")
    n.add_argument("--answer-prefix", default=None,
                   help=f"the start of the answer, written into the prompt (default: '{ANSWER_PREFIX}')")
    n.add_argument("--answer", default=None,
                   help="the expected answer whose words are scored (default: the needle after --answer-prefix)")
    n.add_argument("--pass-recall", type=float, default=None,
                   help="a cell passes when the answer holds at least this fraction of the expected answer's "
                        "non-stop words, case and punctuation ignored (default 0.5); stop words: "
                        + " ".join(sorted(STOP_WORDS)))
    o = p.add_argument_group("output")
    o.add_argument("--train-len", type=int, default=None,
                   help="where the dashed line goes (default: the length a ropelite-finetuned model records in "
                        "config.json, else the RoPE's original_max_position_embeddings)")
    o.add_argument("--out", default="runs/needle",
                   help="results folder; finished cells with the same settings are skipped (default runs/needle)")
    return p.parse_args(argv)


def check_args(args) -> tuple[list[int], list]:
    """The grid, after the flags are checked and the task's defaults filled in."""
    lengths = parse_grid(args.lengths, "--lengths", integer=True)
    depths = parse_grid(args.depths, "--depths", integer=False)
    check(lengths[0] >= 1, "--lengths must be positive")
    check(0 <= depths[0] and depths[-1] <= 100, "--depths are percentages in [0, 100]")
    if args.task == "passkey":
        given = [name for name in NEEDLE_ONLY if getattr(args, name) is not None]
        check(not given, f"--{given[0].replace('_', '-') if given else ''} is a --task needle flag")
        check(args.trials >= 1, "--trials must be at least 1")
        args.question, args.answer_prefix, args.needle = PASSKEY_QUESTION, PASSKEY_PREFIX, PASSKEY_LINE
    else:
        args.needle, args.question = args.needle or NEEDLE, args.question or QUESTION
        args.answer_prefix = args.answer_prefix or ANSWER_PREFIX
        args.pass_recall = 0.5 if args.pass_recall is None else args.pass_recall
        check(0 < args.pass_recall <= 1, "--pass-recall is a fraction in (0, 1]")
    args.max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS[args.task]
    check(args.max_new_tokens >= 1, "--max-new-tokens must be at least 1")
    return lengths, depths


def default_chat(task: str, tokenizer) -> bool:
    """Without --chat / --no-chat: the chat template for the needle when the tokenizer has one (Fu et al.), plain
    text for the passkey (landmark attention, YaRN, LongLoRA)."""
    return task == "needle" and getattr(tokenizer, "chat_template", None) is not None


def main(argv=None) -> None:
    args = parse_args(argv)
    lengths, depths = check_args(args)
    expected = answer_words(args.needle, args.answer_prefix, args.answer) if args.task == "needle" else None
    path = resolve_model(args.model)
    factor = resolve_factor(read_config(path).rope, args.rope, args.factor, args.base)
    model, tokenizer = load_for(args, **rope_overrides(args.rope, factor, args.base, [args.rope]))
    check(tokenizer is not None, f"{args.model} has no tokenizer (tokenizer.json or tokenizer.model)")
    rope = model.config.rope
    chat = default_chat(args.task, tokenizer) if args.chat is None else args.chat
    train_len, train_from = ((args.train_len, "--train-len") if args.train_len else
                             (trained_length(path), "the model's config.json"))
    make, corpus = haystack_maker(args.haystack or DEFAULT_HAYSTACK[args.task], tokenizer, model.config.vocab_size)
    if args.task == "needle":
        template = NEEDLE_TEMPLATE
        hay = build_haystack(make, tokenizer, lengths, template, args.question, args.answer_prefix, args.needle,
                             args.max_new_tokens, chat)
    else:
        template = PASSKEY_TEMPLATE
        hay = passkey_haystack(tokenizer, lengths, args.max_new_tokens, chat, make)

    settings = {"task": args.task, "model": args.model, "rope": dataclasses.asdict(rope), "dtype": args.dtype,
                "haystack": args.haystack or corpus, "corpus": corpus, "chat": chat, "template": template,
                "question": args.question, "answer_prefix": args.answer_prefix, "max_new_tokens": args.max_new_tokens,
                **({"needle": args.needle, "answer_words": expected, "pass_recall": args.pass_recall}
                   if args.task == "needle" else {"key_line": args.needle, "trials": args.trials, "seed": args.seed})}
    sid = settings_id(settings)
    out, name = lock_out(args.out), args.task  # a second run on this --out stops here, in one line
    rows = read_rows(out, name, keys=("settings", "length", "depth"))
    if any("pass_rate_n" not in r for r in rows):  # an older run's: the intervals are made from the trials alone
        rows = [{**r, **cell_intervals(r)} for r in rows]
        write_results(out, name, rows)
    record_settings(out, name, {sid: settings})
    label = rope.describe()
    figure = out / f"{name}_{re.sub(r'[^0-9A-Za-z.]+', '-', label)}_{sid}.png"
    prompt = "chat template" if chat else "plain prompt"
    title = f"{Path(args.model).name} {label}, {args.task} ({prompt})"
    print(f"{args.task}: haystack {corpus}, {prompt}, dashed line at {train_len} "
          f"({train_from})", file=sys.stderr)

    def plot(rows: list[dict]) -> None:
        """Every cell of these settings run so far, in this --out, plus the grid asked for now."""
        mine = [r for r in rows if r["settings"] == sid]
        draw_heatmaps([(title, mine, train_len)], sorted({*lengths, *(r["length"] for r in mine)}),
                      sorted({*depths, *(r["depth"] for r in mine)}), figure)

    cells = [(n, d) for n in lengths for d in depths]
    done = {(r["length"], r["depth"]) for r in rows if r["settings"] == sid}
    todo = [cell for cell in cells if cell not in done]
    if len(todo) < len(cells):
        print(f"{args.task}: {len(cells) - len(todo)} cells already in {out}, {len(todo)} to run", file=sys.stderr)
    trials = args.trials if args.task == "passkey" else 1
    bar = token_bar(sum(n for n, _ in todo) * trials, f"{args.task} {label}")
    for n, d in todo:
        start = time.perf_counter()
        cell = (needle_cell(model, hay, n, d, args.needle, expected, args.pass_recall) if args.task == "needle" else
                passkey_cell(model, hay, n, d, passkeys(args.seed, n, d, args.trials)))
        rows.append({"settings": sid, "task": args.task, "model": args.model, "rope": label, "chat": chat,
                     "corpus": corpus, "train_len": train_len, "length": n, "depth": d, **cell,
                     "seconds": round(time.perf_counter() - start, 2)})
        write_results(out, name, rows)
        plot(rows)
        bar.update(n * trials)
        bar.set_postfix_str(f"{n} @ {d:g}%: pass rate {cell['pass_rate']:.2f}, H={cell['entropy']:.2f}")
    bar.close()
    mine = [r for r in rows if r["settings"] == sid and (r["length"], r["depth"]) in set(cells)]
    if not todo:
        plot(rows)
    findings, numbers = grid_findings(mine, lengths, train_len)
    write_summary(out, name, f"{TITLES[args.task]}, {Path(args.model).name} {label}, {prompt}",
                  CLAIMS[args.task], findings,
                  {"settings": sid, "model": args.model, "rope": label, "depths": depths, **numbers})
    print(text_grid(mine, lengths, depths))
    print(f"{findings[0]} Results in {out / name}.json and .csv, heatmap {figure}")


if __name__ == "__main__":
    run_script(main)
