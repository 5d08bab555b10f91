"""Needle in a haystack and passkey retrieval as library code: the haystack, sentence boundaries, where the
needle goes, the prompt around it, the scoring rules, one experiment cell of each task and the heatmap (needle.py
is the script around them; ablation.py runs the passkey cells on its own models).

- Needle (Fu et al. 2024, the harness the seed paper follows): a sentence hidden at a depth of a long text, a
  question about it, the answer primed with the question's stem; scored by answer-word recall.
- Passkey (landmark attention, YaRN, LongLoRA): an instruction, filler text, "The pass key is K. Remember it.
  K is the pass key." at the depth, more filler, "What is the pass key? The pass key is"; scored by the first
  integer of the answer. Landmark's code cuts the filler by characters and puts the key on its own line; here
  the key goes in as sentences at a sentence boundary, exactly as the needle does, so both tasks share one
  placement rule.

Every context is a prefix of one haystack (token ids), so contexts of different lengths share their text. Every
pass rate carries its Wilson 95 % interval and every mean entropy its standard error, over trials in a cell and
pooled per length (``cell_intervals``, ``pooled_by_length``); below 3 units they are null and n is given.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
import sys
from pathlib import Path

import numpy as np

from ropelite import books
from ropelite.attention import answer_with_entropy
from ropelite.data import KINDS, load_documents, sample_windows, tokenize_checked
from ropelite.errors import RopeliteError
from ropelite.io import pyplot, save_figure
from ropelite.stats import MIN_UNITS, Interval, bootstrap_mean, standard_error, wilson

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER_PREFIX = "The best thing to do in San Francisco is"
# The user turn (Fu et al.'s wording, with "document" for "story book").
NEEDLE_TEMPLATE = ("This is a long document: <document>\n{context}\n</document>\n"
                   "Based on the content of the document, Question: {question}")

# Landmark attention's passkey test, word for word (their grammar included).
PASSKEY_TEMPLATE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                    "I will quiz you about the important information there.\n{context}\n{question}")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_PREFIX = "The pass key is"

TASKS = ("needle", "passkey")
MAX_NEW_TOKENS = {"needle": 32, "passkey": 10}         # greedy answer tokens (Fu et al. ~50; landmark / YaRN ~10)
DEFAULT_HAYSTACK = {"needle": ["books"], "passkey": ["filler"]}

STOP_WORDS = frozenset("a an the and or of in on at to is are was be it its for with by as from that this".split())
SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")  # a sentence's last token, closing quotes or brackets allowed
CLOSER = re.compile(r"[\"')\]]+$")
PASS, FAIL, NOT_RUN = "#0072B2", "#E69F00", "#b8b8b8"  # Okabe-Ito blue / orange: safe for colour-blind readers


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------

def words(text: str) -> list[str]:
    """Lower-cased words, punctuation stripped (the needle scoring's normal form)."""
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
    if not kept:
        raise RopeliteError(f"the expected answer '{answer}' has no words besides stop words")
    return kept


def recall(text: str, expected: list[str]) -> float:
    """Fraction of the expected answer words that occur in ``text``."""
    said = set(words(text))
    return sum(w in said for w in expected) / len(expected)


def first_integer(text: str) -> int | None:
    """The passkey rule: the first run of ASCII digits in the answer, as a number (None when there is none).
    ' 1234 5' -> 1234: a key broken by a space is a wrong key."""
    found = re.search(r"[0-9]+", text)
    return int(found.group()) if found else None


def passkeys(seed: int, length: int, depth: float, trials: int) -> list[int]:
    """``trials`` distinct 5-digit keys for the cell (length, depth), uniform over 10000..99999. Deterministic:
    Python's Random seeded with a string hashes it with SHA-512 (no PYTHONHASHSEED dependence), and trial t's key
    depends only on (seed, length, depth, t), so asking for more trials keeps the first ones."""
    rng = random.Random(f"passkey {seed} {length} {depth:g}")
    keys: list[int] = []
    while len(keys) < trials:
        key = rng.randint(10_000, 99_999)
        if key not in keys:
            keys.append(key)
    return keys


# ----------------------------------------------------------------------------------------------------------------
# The haystack
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Piece:
    """``tokens`` tokens of ``document`` from its token ``offset``, at haystack position ``at``."""
    document: str
    offset: int
    tokens: int
    at: int = 0


def haystack_ids(docs: list, names: list[str], tokenizer, vocab_size: int,
                 need: int) -> tuple[np.ndarray, list[Piece]]:
    """``need`` haystack tokens and the pieces they came from. The sample rule (``sample_windows``, one window):
    the first document with at least ``need`` tokens, from its start. When none is that long, the documents in
    order, blank-line separated, repeated (with a notice) until they reach ``need``. Documents are tokenised
    (without BOS: they are mid-sequence) only until one is long enough; ids are checked against the model's
    vocabulary."""
    sizes, parts = [], []
    for doc in docs:
        (ids,) = tokenize_checked([doc], tokenizer, vocab_size, add_bos=False)
        parts.append(ids)
        sizes.append(ids.size)
        if ids.size >= need:
            ((doc_index, offset),) = sample_windows(sizes, 1, need)
            return parts[doc_index][offset:offset + need], [Piece(names[doc_index], offset, need)]
    if not sum(sizes):
        raise RopeliteError("the haystack is empty")
    (blank,) = tokenize_checked(["\n\n"], tokenizer, vocab_size, add_bos=False)
    stream, pieces, at = [], [], 0
    while at < need:
        for name, ids in zip(names, parts):
            stream += [ids, blank]
            pieces.append(Piece(name, 0, ids.size, at))
            at += ids.size + blank.size
    print(f"haystack: the documents hold {sum(sizes)} tokens; repeating them to reach {need}", file=sys.stderr)
    return np.concatenate(stream)[:need], [p for p in pieces if p.at < need]


def filler_ids(tokenizer, need: int) -> tuple[np.ndarray, list[Piece]]:
    """``need`` tokens of the passkey filler repeated, as the text ' '.join([FILLER] * n) tokenises: the first
    copy without its leading space, the others with it."""
    first = tokenizer.encode(FILLER, add_bos=False)
    rest = tokenizer.encode(" " + FILLER, add_bos=False)
    ids = np.array(first + rest * (-(-max(need - len(first), 0) // len(rest))), dtype=np.int64)
    return ids[:need], [Piece("filler", 0, need)]


def used_pieces(pieces: list[Piece], tokens: int) -> list[list]:
    """[document, offset, tokens] of the pieces that the first ``tokens`` haystack tokens come from."""
    return [[p.document, p.offset, min(p.tokens, tokens - p.at)] for p in pieces if p.at < tokens]


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


# ----------------------------------------------------------------------------------------------------------------
# The prompt
# ----------------------------------------------------------------------------------------------------------------

def render(tokenizer, user: str, answer_prefix: str, chat: bool) -> str:
    """The prompt text of one user turn and the primed answer: inside the chat template (instruct models), or
    plain, 'user answer_prefix' (base models: '... What is the pass key? The pass key is')."""
    if not chat:
        return f"{user} {answer_prefix}"
    if tokenizer.chat_template is None:
        raise RopeliteError("--chat: this tokenizer has no chat template (use --no-chat)")
    return tokenizer.chat(user, answer_prefix)


def prompt_parts(tokenizer, template: str, question: str, answer_prefix: str,
                 chat: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the context in the prompt. The haystack is inserted as tokens, so its
    placement is exact; the text around it is rendered once."""
    marker = "\x00CONTEXT\x00"
    text = render(tokenizer, template.format(context=marker, question=question), answer_prefix, chat)
    if text.count(marker) != 1:
        raise RopeliteError("the chat template does not keep the user's message verbatim")
    before, after = text.split(marker)
    return tokenizer.encode(before), tokenizer.encode(after, add_bos=False)


@dataclasses.dataclass
class Haystack:
    tokenizer: object
    ids: np.ndarray          # haystack tokens, more than the longest context
    starts: np.ndarray       # sentence boundaries, see sentence_starts
    pieces: list[Piece]      # where the haystack tokens come from
    before: list[int]        # prompt tokens before the context
    after: list[int]         # prompt tokens after it (question, answer prefix)
    max_new_tokens: int

    def needle_ids(self, needle: str, pos: int) -> list[int]:
        """The needle's tokens at haystack position ``pos``: after a sentence end it starts with a space; at the
        context start it follows the template's newline and, when the haystack's first token does not start with
        whitespace, a newline separates it from that sentence (no 'sunny day.Chapter I')."""
        if pos > 0:
            return self.tokenizer.encode(" " + needle.strip(), add_bos=False)
        glued = not self.tokenizer.decode([int(self.ids[0])])[:1].isspace()
        return self.tokenizer.encode(needle.strip() + ("\n" if glued else ""), add_bos=False)

    def budget(self, length: int, needle: str) -> int:
        """Haystack tokens that fit in a context of ``length``: the rest is template, question, needle (its
        longer form) and the answer (Fu et al. leave a fixed ~200-token buffer; we measure it)."""
        longest = max(len(self.needle_ids(needle, 0)), len(self.needle_ids(needle, 1)))
        return length - len(self.before) - len(self.after) - longest - self.max_new_tokens

    def prompt(self, length: int, depth: float, needle: str) -> tuple[list[int], int, int, int]:
        """(prompt ids, needle's index in them, context tokens, needle's index in the context)."""
        budget = self.budget(length, needle)
        if budget < 1:
            raise RopeliteError(f"length {length} leaves no room for the haystack next to this needle")
        end, pos = place_needle(self.starts, budget, depth)
        context = [*self.ids[:pos].tolist(), *self.needle_ids(needle, pos), *self.ids[pos:end].tolist()]
        return [*self.before, *context, *self.after], len(self.before) + pos, end, pos


def build_haystack(make, tokenizer, lengths: list[int], template: str, question: str, answer_prefix: str,
                   needle: str, max_new_tokens: int, chat: bool) -> Haystack:
    """The haystack for contexts up to max(lengths). ``make(need) -> (ids, pieces)`` builds ``need`` tokens
    (haystack_ids or filler_ids, bound to their documents); ``needle`` is a representative needle for the
    too-short check (a passkey's length barely depends on its key; ``Haystack.prompt`` checks each one)."""
    before, after = prompt_parts(tokenizer, template, question, answer_prefix, chat)
    fixed = len(before) + len(after) + len(tokenizer.encode(" " + needle, add_bos=False)) + max_new_tokens
    short = [n for n in lengths if n <= fixed]
    if short:
        raise RopeliteError(f"length {short[0]} is too short: template, question and needle take "
                            f"{fixed - max_new_tokens} tokens and the answer {max_new_tokens} more (use > {fixed})")
    # As long as the longest context would be without the needle (so any needle fits), +1: a boundary at the cut
    # needs the token after it.
    ids, pieces = make(max(lengths) - len(before) - len(after) - max_new_tokens + 1)
    return Haystack(tokenizer, ids, sentence_starts(ids, tokenizer), pieces, before, after, max_new_tokens)


def passkey_haystack(tokenizer, lengths: list[int], max_new_tokens: int, chat: bool, make=None) -> Haystack:
    """The passkey task's haystack: landmark attention's template, question and answer prefix, around the filler
    (or ``make``'s text); a 5-digit key line stands in for the too-short check."""
    return build_haystack(make or functools.partial(filler_ids, tokenizer), tokenizer, lengths, PASSKEY_TEMPLATE,
                          PASSKEY_QUESTION, PASSKEY_PREFIX, PASSKEY_LINE.format(key=10_000), max_new_tokens, chat)


def haystack_documents(spec: list[str]) -> tuple[list, list[str], str]:
    """(documents, their names, the corpus's name) for a haystack spec: one built-in corpus by name (books, prose,
    code, mixed), or files and folders, each document named by its path ('path[i]' when the path holds several)."""
    if len(spec) == 1 and spec[0] in KINDS:
        kind = spec[0]
        if kind == "books":
            names, docs = zip(*books.documents())
            return list(docs), list(names), books.CORPUS
        docs = load_documents(None, kind)
        return docs, [f"{kind}[{i}]" for i in range(len(docs))], kind
    docs, names = [], []
    for item in spec:
        found = load_documents([item])
        docs += found
        names += [item] if len(found) == 1 else [f"{item}[{i}]" for i in range(len(found))]
    return docs, names, "files"


def haystack_maker(spec: list[str], tokenizer, vocab_size: int):
    """(make(need) -> (ids, pieces), corpus name) for a haystack spec: ["filler"] is the passkey filler repeated,
    anything else ``haystack_documents``' documents by the sample rule (``haystack_ids``)."""
    if spec == ["filler"]:
        return functools.partial(filler_ids, tokenizer), "filler"
    docs, names, corpus = haystack_documents(spec)
    return functools.partial(haystack_ids, docs, names, tokenizer, vocab_size), corpus


# ----------------------------------------------------------------------------------------------------------------
# One cell of each task: the prompt at (length, depth), the greedy answer, its score and Algorithm 1's entropy
# ----------------------------------------------------------------------------------------------------------------

def needle_cell(model, hay: Haystack, length: int, depth: float, needle: str, expected: list[str],
                pass_recall: float) -> dict:
    """One needle test: ``needle`` at ``depth`` % of a ``length``-token prompt, answered greedily in the
    ``hay.max_new_tokens`` tokens the haystack left room for; it passes when the answer holds at least
    ``pass_recall`` of the ``expected`` words (``answer_words``). The entropy is Algorithm 1's mean over the
    answer's tokens, layers and heads, per layer too. One trial: ``cell_intervals`` gives n = 1 and no interval."""
    ids, needle_at, context, pos = hay.prompt(length, depth, needle)
    answer_ids, per_layer = answer_with_entropy(model, ids, hay.max_new_tokens, hay.tokenizer.eos_id)
    answer = hay.tokenizer.decode(answer_ids)
    score = recall(answer, expected)
    cell = {"tokens": len(ids), "context_tokens": context, "haystack": used_pieces(hay.pieces, context),
            "needle_position": needle_at, "needle_depth": round(100 * pos / max(context, 1), 2), "answer": answer,
            "score": round(score, 4), "pass": score >= pass_recall, "trials": 1,
            "pass_rate": float(score >= pass_recall), "entropy": float(np.mean(per_layer)),
            "entropy_per_layer": per_layer, "generated": len(answer_ids)}
    return {**cell, **cell_intervals(cell)}


def passkey_cell(model, hay: Haystack, length: int, depth: float, keys: list[int]) -> dict:
    """One passkey cell: a trial per key (``passkeys``), each key's line at ``depth`` % of a ``length``-token
    prompt; a trial passes when the answer's first integer is its key. The cell's pass rate is over its trials,
    with its Wilson interval, its entropy the mean of the trials' Algorithm 1 entropies, with its standard error
    over them (``cell_intervals``; per layer: the mean over trials)."""
    trials = []
    for key in keys:
        ids, key_at, context, pos = hay.prompt(length, depth, PASSKEY_LINE.format(key=key))
        answer_ids, per_layer = answer_with_entropy(model, ids, hay.max_new_tokens, hay.tokenizer.eos_id)
        answer = hay.tokenizer.decode(answer_ids)
        trials.append({"tokens": len(ids), "context": context, "key_position": key_at,
                       "key_depth": round(100 * pos / max(context, 1), 2), "answer": answer,
                       "found": first_integer(answer), "per_layer": per_layer, "generated": len(answer_ids)})
    column = lambda name: [t[name] for t in trials]  # noqa: E731
    passed = sum(t["found"] == key for t, key in zip(trials, keys))
    cell = {"tokens": column("tokens"), "context_tokens": column("context"),
            "haystack": used_pieces(hay.pieces, max(column("context"))), "keys": list(keys),
            "key_position": column("key_position"), "key_depth": column("key_depth"), "answers": column("answer"),
            "found": column("found"), "passed": passed, "trials": len(keys), "pass_rate": passed / len(keys),
            "entropy": float(np.mean([np.mean(t["per_layer"]) for t in trials])),
            "entropy_trials": [float(np.mean(t["per_layer"])) for t in trials],
            "entropy_per_layer": np.mean(column("per_layer"), axis=0).tolist(), "generated": column("generated")}
    return {**cell, **cell_intervals(cell)}


def trial_outcomes(cell: dict) -> list[tuple[float, bool]]:
    """(attention entropy, passed) of each trial of a needle or passkey cell: a needle cell is one trial."""
    if "keys" in cell:
        return [(h, found == key) for h, found, key in zip(cell["entropy_trials"], cell["found"], cell["keys"])]
    return [(cell["entropy"], bool(cell["pass"]))]


def mean_se(values: list[float]) -> float | None:
    """The standard error of a mean over its units, None below MIN_UNITS (too few to say anything)."""
    return standard_error(values) if len(values) >= MIN_UNITS else None


def cell_intervals(cell: dict) -> dict:
    """A cell's pass rate with its Wilson 95 % interval over its trials (pass_rate, pass_rate_low, pass_rate_high,
    pass_rate_n) and the standard error of its mean entropy over them (entropy_se, entropy_n); the ends and the
    standard error are null below 3 trials. Made from the trials alone, so rows of an older run get them too."""
    outcomes = trial_outcomes(cell)
    return {**wilson(sum(p for _, p in outcomes), len(outcomes)).fields("pass_rate"),
            "entropy_se": mean_se([h for h, _ in outcomes]), "entropy_n": len(outcomes)}


def counts(row: dict) -> tuple[int, int]:
    """(trials passed, trials) of a cell; a cell written by a caller that kept only its rate counts from it."""
    return (row["passed"] if "passed" in row else round(row["pass_rate"] * row["trials"])), row["trials"]


# ----------------------------------------------------------------------------------------------------------------
# What a grid shows: the headline of its cells
# ----------------------------------------------------------------------------------------------------------------

def _entropy_fields(name: str, values: list[float]) -> dict:
    """name, name_low, name_high, name_n: the mean entropy of some trials with its bootstrap 95 % interval
    (null ends below 3 trials; a null mean when there are none)."""
    if not values:
        return {name: None, f"{name}_low": None, f"{name}_high": None, f"{name}_n": 0}
    return bootstrap_mean(values).fields(name)


def _interval(row: dict, name: str, method: str = "bootstrap") -> Interval:
    """The Interval whose ``fields(name)`` a row holds."""
    return Interval(row[name], row[f"{name}_low"], row[f"{name}_high"], row[f"{name}_n"], method)


def pooled_by_length(rows: list[dict], lengths: list[int]) -> list[dict]:
    """Per length, over its cells (every depth): trials passed, the pooled pass rate with its Wilson 95 % interval
    (pass_rate, pass_rate_low, pass_rate_high, pass_rate_n = trials), the mean attention entropy over the cells
    with its standard error over them (entropy, entropy_se, entropy_n = cells; null below 3), and the mean
    entropy of the passing and of the failing trials with bootstrap intervals (entropy_pass..., entropy_fail...).
    Lengths with no cell are left out. Trials are counted from ``counts`` (a heatmap's rows need no more)."""
    out = []
    for n in lengths:
        mine = [r for r in rows if r["length"] == n]
        if not mine:
            continue
        passed, trials = map(sum, zip(*map(counts, mine)))
        entropies = [r["entropy"] for r in mine]
        row = {"length": n, "cells": len(mine), "passed": passed, "failed": trials - passed,
               **wilson(passed, trials).fields("pass_rate"), "entropy": float(np.mean(entropies)),
               "entropy_se": mean_se(entropies), "entropy_n": len(mine)}
        if all("keys" in r or "pass" in r for r in mine):  # the trials themselves are there
            outcomes = [o for r in mine for o in trial_outcomes(r)]
            row.update(_entropy_fields("entropy_pass", [h for h, p in outcomes if p]))
            row.update(_entropy_fields("entropy_fail", [h for h, p in outcomes if not p]))
        out.append(row)
    return out


def _comparison(claim: str, fail: Interval, passing: Interval) -> dict:
    """For paper.py's verdict: Figure 4's claim, failing trials' entropy above passing ones'."""
    return {"claim": claim, "expected": "higher", "a": {"label": "failing", **dataclasses.asdict(fail)},
            "b": {"label": "passing", **dataclasses.asdict(passing)}}


def grid_findings(rows: list[dict], lengths: list[int], train_len: int) -> tuple[list[str], dict]:
    """(finding lines, numbers) of a needle or passkey grid: trials passed (a needle cell is one trial) with
    their Wilson 95 % interval, overall and on each side of the training length; then a line per length (its
    pooled pass rate with the interval, its mean attention entropy with the standard error over cells, and the
    entropy of its failing and passing trials), so no mean over lengths stands alone; last, the mean entropy of
    passing and failing trials over every length (Figure 4's relation: failures where entropy is high) with
    bootstrap intervals, naming every length at which it goes the other way. ``numbers["comparisons"]``:
    failing against passing entropy, pooled and at each length where both have an interval, for paper.py."""
    unit = "trials" if any("keys" in r for r in rows) else "cells"
    by_length = {n: [o for r in rows if r["length"] == n for o in trial_outcomes(r)] for n in lengths}
    every = [o for n in lengths for o in by_length[n]]
    rate = lambda outcomes: wilson(sum(p for _, p in outcomes), len(outcomes))  # noqa: E731
    count = lambda outcomes: f"{sum(p for _, p in outcomes)}/{len(outcomes)}"  # noqa: E731
    lengths_text = f"{len(lengths)} length{'s' * (len(lengths) != 1)}"
    lines = [f"{count(every)} {unit} pass over {lengths_text}: pass rate {rate(every).text()}."]
    inside = [o for n in lengths if n <= train_len for o in by_length[n]]
    beyond = [o for n in lengths if n > train_len for o in by_length[n]]
    if inside and beyond:
        lines.append(f"Within the training length {train_len}: {count(inside)}, {rate(inside).text()}; past it: "
                     f"{count(beyond)}, {rate(beyond).text()}.")
    per_length = pooled_by_length(rows, lengths)
    comparisons = []
    for r in per_length:
        fail, passing = _interval(r, "entropy_fail"), _interval(r, "entropy_pass")
        groups = "; ".join(f"{name} {i.text()}" for name, i in (("failing", fail), ("passing", passing)) if i.n)
        se = "" if r["entropy_se"] is None else f"SE {r['entropy_se']:.2f}, "
        lines.append(f"{r['length']} tokens{' (past the training length)' if r['length'] > train_len else ''}: "
                     f"{r['passed']}/{r['pass_rate_n']} {unit} pass, {_interval(r, 'pass_rate', 'wilson').text()}; mean "
                     f"attention entropy {r['entropy']:.2f} nats ({se}n={r['cells']} cells); "
                     f"{groups}.")
        if fail.known and passing.known:
            comparisons.append(_comparison(f"At {r['length']} tokens, the failing {unit}' attention entropy is "
                                           f"above the passing ones'", fail, passing))
    fail_all, pass_all = (_entropy_fields(name, [h for h, p in every if p == want])
                          for name, want in (("entropy_fail", False), ("entropy_pass", True)))
    if not (fail_all["entropy_fail_n"] and pass_all["entropy_pass_n"]):
        only = "passed" if not fail_all["entropy_fail_n"] else "failed"
        lines.append(f"Mean attention entropy {np.mean([h for h, _ in every]):.2f} nats over all {len(every)} "
                     f"{unit}, every one of which {only}: no passing / failing comparison.")
    else:
        fail, passing = _interval(fail_all, "entropy_fail"), _interval(pass_all, "entropy_pass")
        higher = fail.estimate > passing.estimate
        mixed = [r for r in per_length if r.get("entropy_pass_n") and r.get("entropy_fail_n")]
        flips = [f"{r['length']} (failing {r['entropy_fail']:.2f}, passing {r['entropy_pass']:.2f})"
                 for r in mixed if (r["entropy_fail"] > r["entropy_pass"]) != higher]
        where = ("no length holds both" if not mixed else "the same at every length that holds both" if not flips
                 else "the other way at " + ", ".join(flips))
        lines.append(f"Mean attention entropy over every length, {fail.text()} nats over the failing {unit}, "
                     f"{passing.text()} over the passing ones: {'higher' if higher else 'not higher'} for the "
                     f"failing ones; per length, {where}.")
        comparisons.insert(0, _comparison(f"Over every length pooled, the failing {unit}' attention entropy is "
                                          "above the passing ones'", fail, passing))
    numbers = {"unit": unit, "train_len": train_len, **rate(every).fields("pass_rate"),
               "passed": sum(p for _, p in every), **fail_all, **pass_all, "per_length": per_length,
               "comparisons": comparisons}
    return lines, numbers


# ----------------------------------------------------------------------------------------------------------------
# Heatmaps
# ----------------------------------------------------------------------------------------------------------------

def boundary_x(lengths: list[int], train_len: int) -> float | None:
    """x of the dashed training-length line, columns being at x = 0..n-1: on the edge between the last column at
    or below ``train_len`` and the first above it. None when every column is on one side (a line on the plot's
    edge would say nothing; the panel's title gives the length)."""
    inside = sum(n <= train_len for n in lengths)
    return inside - 0.5 if 0 < inside < len(lengths) else None


def draw_heatmaps(panels: list[tuple[str, list[dict], int]], lengths: list[int], depths: list, path: Path,
                  title: str | None = None) -> None:
    """Figure 4 of the seed paper, one panel per (title, rows, train_len), side by side with shared axes: colour =
    pass rate per (length, depth) cell (needle: pass blue / fail orange; passkey: a blue-orange scale over its
    trials, each cell printing its k/n trials passed), the cell's mean attention entropy in nats written in it,
    and a dashed line at each panel's own training length (``boundary_x``). Under each panel a strip gives, per
    length, the pass rate pooled over its depths and trials with its Wilson 95 % interval as a bar (none below 3
    trials), so the interval's width shows. Rows carry length, depth, pass_rate, trials (and passed) and
    entropy."""
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = pyplot()
    rated = any(r.get("trials", 1) > 1 for _, rows, _ in panels for r in rows)
    cmap = LinearSegmentedColormap.from_list("pass_rate", [FAIL, "#f4f4f4", PASS]).with_extremes(bad=NOT_RUN)
    small = len(lengths) > 12
    width = max(3.5, 1.2 + 0.55 * len(lengths))
    fig, axes = plt.subplots(2, len(panels), figsize=(width * len(panels) + 1.5, 3.8 + 0.4 * len(depths)),
                             sharex="col", sharey="row", squeeze=False, layout="constrained",
                             height_ratios=[max(len(depths), 2), 2])
    for ax, strip, (name, rows, train_len) in zip(axes[0], axes[1], panels):
        image = _draw_panel(ax, rows, lengths, depths, train_len, cmap, small)
        ax.set_title(f"{name}\n{panel_summary(rows, lengths, depths, train_len)}", fontsize=9)
        _draw_strip(strip, [r for r in rows if r["depth"] in depths], lengths, train_len, small)
        strip.set_xlabel("context length (tokens)")
    axes[0][0].set_ylabel("depth (% of the context)")
    axes[1][0].set_ylabel("pass rate\nper length", fontsize=8)
    handles = [] if rated else [Patch(color=PASS, label="pass"), Patch(color=FAIL, label="fail")]
    complete = [{(r["length"], r["depth"]) for r in rows} >= {(n, d) for n in lengths for d in depths}
                for _, rows, _ in panels]
    if not all(complete):
        handles.append(Patch(color=NOT_RUN, label="not run"))
    if any(boundary_x(lengths, train_len) is not None for *_, train_len in panels):
        handles.append(Line2D([], [], color="black", linestyle="--", label="training length"))
    if rated:
        fig.colorbar(image, ax=list(axes[0]), label="pass rate", shrink=0.9)
    numbers = (["k/n: trials passed"] * rated + ["number: mean attention entropy of the answer (nats)",
               "strip: pass rate per length (all depths),", "bar: its Wilson 95 % interval"])
    fig.suptitle("\n".join([title] * bool(title) + numbers), fontsize=9)
    if handles:  # a complete passkey grid inside the training length has nothing to key but the colorbar
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    save_figure(fig, path)


def panel_summary(rows: list[dict], lengths: list[int], depths: list, train_len: int) -> str:
    """'training length 4096,\n7/12 cells pass, 0.58 [0.32, 0.81] (n=12)' (trials for passkey): the pass rate
    pooled over the panel with its Wilson interval, saying when the training length lies outside the grid (no
    dashed line then)."""
    shown = [r for r in rows if r["length"] in lengths and r["depth"] in depths]
    where = "" if boundary_x(lengths, train_len) is not None else (
        " (no column above it)" if train_len >= lengths[-1] else " (every column above it)")
    if not shown:
        return f"training length {train_len}{where}, nothing run"
    passed, trials = map(sum, zip(*map(counts, shown)))
    unit = "trials" if any(r.get("trials", 1) > 1 for r in shown) else "cells"
    return f"training length {train_len}{where},\n{passed}/{trials} {unit} pass, {wilson(passed, trials).text()}"


def _draw_panel(ax, rows: list[dict], lengths: list[int], depths: list, train_len: int, cmap, small: bool):
    """One heatmap panel; returns its image (for the colorbar)."""
    rate = np.full((len(depths), len(lengths)), np.nan)
    for r in rows:
        if r["length"] in lengths and r["depth"] in depths:
            i, j = depths.index(r["depth"]), lengths.index(r["length"])
            rate[i, j] = r["pass_rate"]
            label = f"{r['entropy']:.{1 if small else 2}f}"
            if r.get("trials", 1) > 1:
                label = "{}/{}\n".format(*counts(r)) + label
            ax.text(j, i, label, ha="center", va="center", fontsize=6 if small else 8,
                    color="white" if r["pass_rate"] > 0.65 else "black")
    image = ax.imshow(np.ma.masked_invalid(rate), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    x = boundary_x(lengths, train_len)
    if x is not None:
        ax.axvline(x, color="black", linestyle="--", linewidth=2)
    return image


def _draw_strip(ax, rows: list[dict], lengths: list[int], train_len: int, small: bool) -> None:
    """The strip under a panel: per length its pooled pass rate (a dot) and Wilson 95 % interval (a bar), with
    k/n above the bar's top; a length with fewer than 3 trials has a dot alone."""
    pooled = {r["length"]: r for r in pooled_by_length(rows, lengths)}
    for j, n in enumerate(lengths):
        if n not in pooled:
            continue
        r = pooled[n]
        known = r["pass_rate_low"] is not None
        yerr = [[r["pass_rate"] - r["pass_rate_low"]], [r["pass_rate_high"] - r["pass_rate"]]] if known else None
        ax.errorbar([j], [r["pass_rate"]], yerr=yerr, fmt="o", color="black", markersize=3.5, capsize=2.5,
                    linewidth=1.2)
        ax.text(j, (r["pass_rate_high"] if known else r["pass_rate"]) + 0.06, f"{r['passed']}/{r['pass_rate_n']}",
                ha="center", va="bottom", fontsize=5.5 if small else 7)
    ax.set_ylim(-0.08, 1.35)
    ax.set_yticks([0, 0.5, 1])
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=90 if small else 0,
                  fontsize=7 if small else 9)
    x = boundary_x(lengths, train_len)
    if x is not None:
        ax.axvline(x, color="black", linestyle="--", linewidth=1.2)


def text_grid(rows: list[dict], lengths: list[int], depths: list) -> str:
    """The heatmap as text: per cell 'P 5.21' / 'F 7.80' (needle) or '3/5 5.21±0.04' (passkey: trials passed, the
    mean entropy ± its standard error over the trials, left out below 3), '-' not run; under the grid, per length,
    the trials passed, the pooled pass rate with its Wilson 95 % interval and the mean entropy ± its standard error
    over the cells."""
    def cell(r: dict) -> str:
        se = "" if r.get("entropy_se") is None else f"±{r['entropy_se']:.2f}"
        if r.get("trials", 1) > 1:
            return "{}/{} ".format(*counts(r)) + f"{r['entropy']:.2f}{se}"
        return f"{'P' if r['pass_rate'] == 1 else 'F'} {r['entropy']:.2f}"

    pooled = {r["length"]: r for r in pooled_by_length(rows, lengths)}
    summary = {n: [f"{r['passed']}/{r['pass_rate_n']}",
                   f"{r['pass_rate']:.2f}" + ("" if r["pass_rate_low"] is None else
                                             f" [{r['pass_rate_low']:.2f}, {r['pass_rate_high']:.2f}]"),
                   f"{r['entropy']:.2f}" + ("" if r["entropy_se"] is None else f" ± {r['entropy_se']:.2f}")]
               for n, r in pooled.items()}
    cells = {(r["length"], r["depth"]): cell(r) for r in rows}
    width = max([9, *map(len, cells.values()), *(len(t) for texts in summary.values() for t in texts)])
    line = lambda head, texts: f"{head:>12} " + " ".join(f"{t:>{width}}" for t in texts)  # noqa: E731
    lines = [line("depth\\len", lengths)]
    lines += [line(f"{d:g}", [cells.get((n, d), "-") for n in lengths]) for d in depths]
    for k, head in enumerate(("passed", "pass rate", "entropy")):
        lines.append(line(head, [summary[n][k] if n in summary else "-" for n in lengths]))
    return "\n".join(lines) + ("\npass rate: pooled over depths and trials, [Wilson 95 % interval]; entropy: nats, "
                               "mean ± standard error over the cells (over the trials within a passkey cell)")
