"""Needle in a haystack with attention entropy per cell: the seed paper's Figure 4 and Algorithm 1.

    python needle.py                                         # small CPU grid: SmolLM2, 3 lengths x 5 depths
    python needle.py --rope yarn --factor 4 --lengths 1000 8000 16000 --depths 0 50 100
    python needle.py --lengths 1000:131072:32 --depths 0:100:10   # the paper's grid (round(linspace(...)))

Protocol (Fu et al. 2024, the harness the seed paper follows). For each context length L and depth d %:
  1. the haystack (--haystack files, else the built-in prose) is cut to the tokens that fit in L once the
     template, question, needle and --max-new-tokens answer tokens are counted, and cut back to a sentence end;
  2. the needle goes in at d % of that context, moved back to the nearest sentence boundary before it
     (a token ending in . ! or ? followed by one starting with whitespace; the context start counts);
  3. the prompt asks the question inside the model's chat template (if it has one) and primes the answer with
     --answer-prefix; the model decodes greedily with the KV cache, up to --max-new-tokens tokens;
  4. scoring: the answer words are the needle's words after the answer prefix, minus stop words (default:
     eat sandwich sit dolores park sunny day). Words are lower-cased with punctuation stripped. A cell passes
     when the generated text contains at least --pass-recall (default 0.5) of them. The raw answer is kept.
  5. attention entropy (seed paper Appendix C, Algorithm 1): the prompt is prefilled on the fast path; for
     every generated token, the entropy -sum p ln p (nats) of its own attention row, per layer and head,
     averaged over heads, then layers, then generated tokens. Per-layer means are kept too. Memory per step
     is O(L): one row per layer.

Outputs in --out (default runs/needle): needle.json and needle.csv (one row per cell, rewritten atomically after
every cell), needle_settings.json (what each settings id means) and needle_<rope>_<id>.png, the heatmap
(x = length, y = depth, green = pass, red = fail, grey = not run, mean entropy in each cell, dashed line at
--train-len). The heatmap shows every cell run with these settings in --out, so grids run one after another add
up. Running again with the same --out skips the cells already done with the same settings, so a killed run
resumes; rows of other settings (another --rope, say) stay in the files and get their own heatmap.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

import numpy as np

import ropelite
from ropelite.attention import answer_with_entropy
from ropelite.cli import (DTYPES, GRID_HELP, ArgumentParser, add_model_args, check, parse_grid, rope_overrides, run,
                          token_bar)
from ropelite.data import load_documents
from ropelite.errors import RopeliteError
from ropelite.io import pyplot, read_rows, record_settings, save_figure, settings_id, write_results

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER_PREFIX = "The best thing to do in San Francisco is"
# The user turn (Fu et al.'s wording, with "document" for "story book": the built-in haystack is a manual).
TEMPLATE = ("This is a long document: <document>\n{context}\n</document>\n"
            "Based on the content of the document, Question: {question}")
STOP_WORDS = frozenset("a an the and or of in on at to is are was be it its for with by as from that this".split())
SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")  # a sentence's last token, closing quotes or brackets allowed
CLOSER = re.compile(r"[\"')\]]+$")
RESULTS = "needle"


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------

def words(text: str) -> list[str]:
    """Lower-cased words, punctuation stripped (the scoring's normal form)."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def answer_words(needle: str, answer_prefix: str, answer: str | None = None) -> list[str]:
    """The words a correct answer must contain: those of ``answer`` if given, else of the needle after the
    answer prefix (the question's stem); stop words dropped."""
    if answer is None:
        stem, said = words(answer_prefix), words(needle)
        if said[:len(stem)] != stem:
            raise RopeliteError("the needle does not start with the answer prefix, so the expected answer cannot "
                                "be derived from it: give --answer")
        answer = " ".join(said[len(stem):])
    kept = list(dict.fromkeys(w for w in words(answer) if w not in STOP_WORDS))
    check(bool(kept), f"the expected answer '{answer}' has no words besides stop words")
    return kept


def recall(text: str, expected: list[str]) -> float:
    """Fraction of the expected answer words that occur in ``text``."""
    said = set(words(text))
    return sum(w in said for w in expected) / len(expected)


# ----------------------------------------------------------------------------------------------------------------
# Haystack, needle placement, prompt
# ----------------------------------------------------------------------------------------------------------------

def haystack_ids(docs: list, tokenizer, need: int) -> np.ndarray:
    """At least ``need`` tokens of the documents, in order, blank-line separated; repeated (with a notice)
    when they are too short. Only as many documents as needed are tokenised."""
    parts, total = [], 0
    for doc in docs:
        if isinstance(doc, np.ndarray):
            ids = doc.astype(np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise RopeliteError(f"haystack token ids outside the tokenizer's vocabulary ({tokenizer.vocab_size})")
        else:  # no BOS: these are mid-sequence
            ids = np.asarray(tokenizer.encode(doc.strip() + "\n\n", add_bos=False), dtype=np.int64)
        parts.append(ids)
        total += ids.size
        if total >= need:
            break
    ids = np.concatenate(parts)
    check(ids.size > 0, "the haystack is empty")
    if ids.size < need:
        copies = -(-need // ids.size)
        print(f"needle: the haystack has {ids.size} tokens; repeating it {copies} times to reach {need}",
              file=sys.stderr)
        ids = np.tile(ids, copies)
    return ids[:need]


def sentence_starts(ids: np.ndarray, tokenizer) -> np.ndarray:
    """starts[i] (i = 0..len(ids)) is True when a sentence may begin before token i: i = 0, or token i-1 ends
    a sentence and token i starts with whitespace (so 'os.path' and '3.14' are not boundaries)."""
    text = {int(t): tokenizer.decode([int(t)]) for t in np.unique(ids)}
    ends = np.zeros(len(ids) + 1, dtype=bool)
    for i, t in enumerate(ids.tolist()):  # a lone closing quote after a sentence end still ends it
        ends[i] = bool(SENTENCE_END.search(text[t])) or (i > 0 and ends[i - 1] and bool(CLOSER.match(text[t])))
    spaced = np.array([True] + [text[int(t)][:1].isspace() for t in ids[1:]] + [True])
    starts = np.concatenate([[True], ends[:-1]]) & spaced
    starts[0] = True
    return starts


def last_start(starts: np.ndarray, at: int) -> int:
    """The nearest sentence boundary at or before token index ``at``."""
    return int(np.flatnonzero(starts[:at + 1])[-1])


def place_needle(starts: np.ndarray, budget: int, depth: float) -> tuple[int, int]:
    """(context end, needle position) in haystack tokens: the context is the first ``budget`` tokens cut back
    to a sentence end (kept whole when it has no boundary), the needle goes at depth % of it, moved back to the
    nearest sentence boundary (Fu et al.)."""
    end = last_start(starts, budget) or budget
    return end, last_start(starts, round(depth / 100 * end))


def prompt_parts(tokenizer, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the context in the prompt. The haystack is inserted as tokens, so its
    placement is exact; the template around it is rendered once, with the chat template when there is one."""
    marker = "\x00CONTEXT\x00"
    text = tokenizer.chat(TEMPLATE.format(context=marker, question=question), answer_prefix)
    check(text.count(marker) == 1, "the chat template does not keep the user's message verbatim")
    before, after = text.split(marker)
    return tokenizer.encode(before), tokenizer.encode(after, add_bos=False)


@dataclasses.dataclass
class Haystack:
    ids: np.ndarray          # haystack tokens, at least the longest context + 1
    starts: np.ndarray       # sentence boundaries, see sentence_starts
    before: list[int]        # prompt tokens before the context
    after: list[int]         # prompt tokens after it (question, answer prefix)
    needle: list[int]
    max_new_tokens: int

    def budget(self, length: int) -> int:
        """Haystack tokens that fit in a context of ``length``: the rest is template, question, needle and the
        answer (Fu et al. leave a fixed ~200-token buffer; we measure it)."""
        return length - len(self.before) - len(self.after) - len(self.needle) - self.max_new_tokens

    def prompt(self, length: int, depth: float) -> tuple[list[int], int, int, int]:
        """(prompt ids, needle's index in them, context tokens, needle's index in the context)."""
        end, pos = place_needle(self.starts, self.budget(length), depth)
        context = [*self.ids[:pos].tolist(), *self.needle, *self.ids[pos:end].tolist()]
        return [*self.before, *context, *self.after], len(self.before) + pos, end, pos


def build_haystack(docs: list, tokenizer, lengths: list[int], needle: str, question: str, answer_prefix: str,
                   max_new_tokens: int) -> Haystack:
    before, after = prompt_parts(tokenizer, question, answer_prefix)
    needle_ids = tokenizer.encode(" " + needle.strip(), add_bos=False)  # follows a sentence end and its space
    fixed = len(before) + len(after) + len(needle_ids) + max_new_tokens
    short = [n for n in lengths if n < fixed]
    check(not short, f"length {short[0] if short else 0} is too short: template, question and needle take "
                     f"{fixed - max_new_tokens} tokens and the answer {max_new_tokens} more (use >= {fixed})")
    ids = haystack_ids(docs, tokenizer, max(lengths) - fixed + 1)  # +1: a boundary at the cut needs the next token
    return Haystack(ids, sentence_starts(ids, tokenizer), before, after, needle_ids, max_new_tokens)


# ----------------------------------------------------------------------------------------------------------------
# Results: resume, heatmap
# ----------------------------------------------------------------------------------------------------------------

def draw_heatmap(rows: list[dict], lengths: list[int], depths: list, train_len: int, path: Path,
                 title: str) -> None:
    """Figure 4 of the seed paper: pass (green) / fail (red) per (length, depth), mean entropy written in."""
    from matplotlib.colors import ListedColormap

    state = np.full((len(depths), len(lengths)), -1.0)           # -1 not run, 0 fail, 1 pass
    fig, ax = pyplot().subplots(figsize=(max(4.0, 2 + 0.55 * len(lengths)), 2 + 0.4 * len(depths)))
    small = len(lengths) > 12
    for r in rows:
        if r["length"] in lengths and r["depth"] in depths:
            i, j = depths.index(r["depth"]), lengths.index(r["length"])
            state[i, j] = float(r["pass"])
            if r["entropy"] is not None:
                ax.text(j, i, f"{r['entropy']:.{1 if small else 2}f}", ha="center", va="center",
                        fontsize=6 if small else 8, color="white")
    ax.imshow(state, cmap=ListedColormap(["#cccccc", "#d7301f", "#1a9850"]), vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=90 if small else 0,
                  fontsize=7 if small else 9)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    # The training length between columns, by linear interpolation of the column positions.
    x = np.interp(train_len, lengths, range(len(lengths))) if len(lengths) > 1 else 0.0
    if train_len <= lengths[-1]:
        ax.axvline(-0.5 if train_len < lengths[0] else x, color="white", linestyle="--", linewidth=2)
    passed = int((state == 1).sum())
    ax.set_title(f"{title}\n{passed}/{int((state >= 0).sum())} pass, dashed: train length {train_len}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def text_grid(rows: list[dict], lengths: list[int], depths: list) -> str:
    """The heatmap as text: 'P 5.21' / 'F 7.80' per cell, '-' when not run."""
    cell = {(r["length"], r["depth"]): f"{'P' if r['pass'] else 'F'} {r['entropy']:.2f}" for r in rows}
    lines = ["depth\\len " + " ".join(f"{n:>8}" for n in lengths)]
    for d in depths:
        lines.append(f"{d:>9g} " + " ".join(f"{cell.get((n, d), '-'):>8}" for n in lengths))
    return "\n".join(lines)


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
    t.add_argument("--haystack", nargs="+", default=None, metavar="PATH",
                   help="text / .jsonl / .npy / .bin files or folders for the haystack, in order (default: the "
                        "built-in prose, Python's reference manual); repeated when shorter than the longest context")
    t.add_argument("--needle", default=NEEDLE, help=f"the sentence to hide (default: '{NEEDLE}')")
    t.add_argument("--question", default=QUESTION, help=f"the question asked after the context (default: '{QUESTION}')")
    t.add_argument("--answer-prefix", default=ANSWER_PREFIX,
                   help=f"the start of the answer, written into the prompt (default: '{ANSWER_PREFIX}')")
    t.add_argument("--answer", default=None,
                   help="the expected answer whose words are scored (default: the needle after --answer-prefix)")
    t.add_argument("--pass-recall", type=float, default=0.5,
                   help="a cell passes when the answer holds at least this fraction of the expected answer's "
                        "non-stop words, case and punctuation ignored (default 0.5); stop words: "
                        + " ".join(sorted(STOP_WORDS)))
    t.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length limit (default 32)")
    o = p.add_argument_group("output")
    o.add_argument("--train-len", type=int, default=None,
                   help="where the dashed line goes (default: the model's original_max_position_embeddings)")
    o.add_argument("--out", default="runs/needle",
                   help="results folder; finished cells with the same settings are skipped (default runs/needle)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    lengths = parse_grid(args.lengths, "--lengths", integer=True)
    depths = parse_grid(args.depths, "--depths", integer=False)
    check(lengths[0] >= 1, "--lengths must be positive")
    check(0 <= depths[0] and depths[-1] <= 100, "--depths are percentages in [0, 100]")
    check(args.max_new_tokens >= 1, "--max-new-tokens must be at least 1")
    check(0 < args.pass_recall <= 1, "--pass-recall is a fraction in (0, 1]")
    expected = answer_words(args.needle, args.answer_prefix, args.answer)
    docs = load_documents(args.haystack, "prose")

    model, tokenizer = ropelite.load(args.model, dtype=DTYPES[args.dtype], device=args.device,
                                     **rope_overrides(args.rope, args.factor, args.base, [args.rope]))
    check(tokenizer is not None, f"{args.model} has no tokenizer (tokenizer.json or tokenizer.model)")
    rope = model.config.rope
    train_len = args.train_len or rope.original_max_position_embeddings
    hay = build_haystack(docs, tokenizer, lengths, args.needle, args.question, args.answer_prefix,
                         args.max_new_tokens)

    settings = {"model": args.model, "rope": dataclasses.asdict(rope), "dtype": args.dtype,
                "haystack": args.haystack or "builtin:prose", "needle": args.needle, "question": args.question,
                "answer_prefix": args.answer_prefix, "answer_words": expected, "pass_recall": args.pass_recall,
                "max_new_tokens": args.max_new_tokens, "template": TEMPLATE}
    sid = settings_id(settings)
    out = Path(args.out)
    rows = read_rows(out, RESULTS, keys=("settings", "length", "depth"))
    record_settings(out, RESULTS, {sid: settings})
    label = rope.describe()
    figure = out / f"{RESULTS}_{re.sub(r'[^0-9A-Za-z.]+', '-', label)}_{sid}.png"
    title = f"{Path(args.model).name} {label}"

    def plot(rows: list[dict]) -> None:
        """Every cell of these settings run so far, in this --out, plus the grid asked for now."""
        mine = [r for r in rows if r["settings"] == sid]
        draw_heatmap(mine, sorted({*lengths, *(r["length"] for r in mine)}),
                     sorted({*depths, *(r["depth"] for r in mine)}), train_len, figure, title)

    cells = [(n, d) for n in lengths for d in depths]
    done = {(r["length"], r["depth"]) for r in rows if r["settings"] == sid}
    todo = [cell for cell in cells if cell not in done]
    if len(todo) < len(cells):
        print(f"needle: {len(cells) - len(todo)} cells already in {out}, {len(todo)} to run", file=sys.stderr)
    bar = token_bar(sum(n for n, _ in todo), f"needle {label}")
    for n, d in todo:
        ids, needle_at, context, pos = hay.prompt(n, d)
        start = time.perf_counter()
        answer_ids, per_layer = answer_with_entropy(model, ids, args.max_new_tokens, tokenizer.eos_id)
        answer = tokenizer.decode(answer_ids)
        score = recall(answer, expected)
        rows.append({"settings": sid, "model": args.model, "rope": label, "length": n, "depth": d,
                     "tokens": len(ids), "context_tokens": context, "needle_position": needle_at,
                     "needle_depth": round(100 * pos / max(context, 1), 2), "answer": answer,
                     "score": round(score, 4), "pass": score >= args.pass_recall,
                     "entropy": float(np.mean(per_layer)), "entropy_per_layer": per_layer,
                     "generated": len(answer_ids), "seconds": round(time.perf_counter() - start, 2)})
        write_results(out, RESULTS, rows)
        plot(rows)
        bar.update(n)
        bar.set_postfix_str(f"{n} @ {d:g}%: {'pass' if rows[-1]['pass'] else 'fail'}, "
                            f"H={rows[-1]['entropy']:.2f}")
    bar.close()
    mine = [r for r in rows if r["settings"] == sid and (r["length"], r["depth"]) in set(cells)]
    if not todo:
        plot(rows)
    print(text_grid(mine, lengths, depths))
    print(f"{sum(r['pass'] for r in mine)}/{len(cells)} pass; results in {out / RESULTS}.json and .csv, "
          f"heatmap {figure}")


if __name__ == "__main__":
    run(main)
