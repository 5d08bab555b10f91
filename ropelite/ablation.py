"""The seed paper's third finding in miniature (Zhong et al. 2024, §4.3, Figure 4 e-f): "we finetune models on 4K
and 32K training lengths with the same tokens on NTK ... models trained in more extended contexts exhibited
significantly lower attention uncertainty". No short-context LLaMa exists offline, so the miniature trains its
own. These are its pieces; ``ropelite.ablation_design`` holds its sizes and models, ``ropelite.ablation_pipeline``
runs it, ``ropelite.ablation_report`` reads the results, and ``ablation.py`` is its command line.

- Text (``split_documents``): the built-in books, prose and code. Prose topics and code modules that share
  word runs are grouped (``overlap_groups``) and whole groups are held out, so that at most 1 % of any held-out
  window's 12-word runs occur verbatim in the training text (``overlap``); each book's last 10 % is held out,
  cut at a line break it has. A LLaMa-2-style sentencepiece ``tokenizer.model`` is trained on the training text.
- Pretraining rows (``MixedRows``): text from a random offset of the training stream; passkey documents, the
  very prompt the evaluation asks (``ropelite.haystack``'s template and filler) followed by the answer " K." and
  EOS, their answer tokens weighted up in the loss; copy rows (a text segment tiled over the row, the repeated
  structure that makes induction heads form early). A row is a pure function of (seed, index).
- Finetuning stream (``finetune_stream``): ONE token stream, with a loss weight per token, built from blocks of
  L tokens whose contents do not depend on the row length (text read in order; passkey documents of at most L
  tokens, as in pretraining; copy blocks of L), then cut into rows of L or of 8L (``StreamRows``). Both arms of
  the ablation consume the same tokens in the same order with the same weights, in the same steps: the seed
  paper's "same tokens", the one variable being how far attention reaches back.
- Training (``train``): train.py's own optimizer step (``ropelite.trainer.optimizer_step``: AdamW, clip 1) with
  ``ropelite.training``'s schedule, its loss the per-token weighted NLL (``weighted_nll``). A ``Recipe`` holds
  the tokens per step as sequences x length, so the L and 8L finetunes of one budget differ only in the cut.
- Evaluation (``window_rows``): on each held-out window, one forward gives the perplexity at every length (the
  truncate protocol, and the last L tokens of each length, which a break past L cannot hide in) and the last
  query's attention entropy at every length (causal attention: the first n tokens' numbers do not depend on
  what follows them); unigram / bigram count models are a floor of what "a language model" means here. The
  passkey grid is needle.py's (same prompt, scorer and Algorithm 1 entropy).
- Verdicts (``claim_1``, ``claim_2``): each claim of the paper, per length, read off 95 % intervals (Wilson for
  pass rates, a seeded bootstrap over finetune seeds and units for means) by rules fixed before any run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .data import named_builtin_documents, sample_windows
from .errors import RopeliteError
from .haystack import (FILLER, PASSKEY_LINE, PASSKEY_PREFIX, PASSKEY_QUESTION, PASSKEY_TEMPLATE, build_haystack,
                       filler_ids)
from .io import write_json
from .loss import LinearCrossEntropy
from .model import Llama, LlamaConfig
from .parallel import make_optimizer
from .stats import Interval, bootstrap_mean, compare, entropy, wilson
from .tokenizer import Tokenizer, load_tokenizer
from .trainer import optimizer_step
from .training import learning_rate, trained_record

HOLDOUT_EVERY = 10     # every 10th group of prose topics / code modules is held out ...
BOOK_HELD_OUT = 0.1    # ... and the last 10 % of each book
WORD_RUN = 12          # the held-out rule: at most OVERLAP_LIMIT of a window's runs of WORD_RUN words ...
OVERLAP_LIMIT = 0.01   # ... occur verbatim in the training text
KEY_RANGE = (10_000, 100_000)
PROBE_COPIES = 200


# ----------------------------------------------------------------------------------------------------------------
# Text: the split, the overlap rule, the tokenizer, the held-out windows
# ----------------------------------------------------------------------------------------------------------------

def word_runs(text: str, n: int = WORD_RUN) -> list[int]:
    """A hash of each run of ``n`` consecutive words of ``text`` (words: split at whitespace, kept verbatim,
    case and punctuation included), one per position."""
    words = text.split()
    return [hash(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)]


def overlap(text: str, seen: set[int]) -> float:
    """The share of ``text``'s word runs (``word_runs``, counted per position) that occur in ``seen`` (the runs of
    the training text); 0 for a text shorter than one run."""
    runs = word_runs(text)
    return sum(r in seen for r in runs) / len(runs) if runs else 0.0


def overlap_groups(texts: list[str], limit: float = OVERLAP_LIMIT) -> list[list[int]]:
    """Documents joined into groups (connected components, sorted by their first index): documents i and j are in
    one group when more than ``limit`` of i's word runs occur in j, or of j's in i (pydoc's ``for`` lies ~99 %
    inside ``compound``, ``customization`` inside ``specialnames``). Holding out whole groups keeps a held-out
    document's text out of training."""
    runs = [set(word_runs(t)) for t in texts]
    holders: dict[int, list[int]] = {}
    for i, rs in enumerate(runs):
        for r in rs:
            holders.setdefault(r, []).append(i)
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, rs in enumerate(runs):
        shared: dict[int, int] = {}                              # j -> runs of i that j holds too
        for r in rs:
            for j in holders[r]:
                if j != i:
                    shared[j] = shared.get(j, 0) + 1
        for j, count in shared.items():
            if count > limit * len(rs):                          # the relation is made symmetric by the union
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(texts)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def book_cut(text: str, held_out: float = BOOK_HELD_OUT) -> int:
    """Where a book's held-out tail begins: after the last paragraph break (a blank line) before the last
    ``held_out`` of its characters, or after the last line break when it has no blank line (Botchan)."""
    end = round(len(text) * (1 - held_out))
    for sep in ("\n\n", "\n"):
        at = text.rfind(sep, 0, end)
        if at > 0:
            return at + len(sep)
    raise RopeliteError("a book without a line break before its last part cannot be split at one")


@dataclasses.dataclass(frozen=True)
class Split:
    """Training texts; held-out (name, text) by kind; held-out documents dropped because the overlap rule
    failed for them (name, overlap)."""
    train: list[str]
    held: dict[str, list[tuple[str, str]]]
    dropped: list[tuple[str, float]]


def split_documents(kinds: tuple[str, ...] = ("books", "prose", "code")) -> Split:
    """Books: the head of each trains, its tail (``book_cut``) is held out, named ``book[from:]`` (characters).
    Prose topics and code modules: their ``overlap_groups``; every HOLDOUT_EVERY-th group (groups 5, 15, 25, ...
    counted from 0) is held out whole. A held-out document with more than OVERLAP_LIMIT of its word runs in the training text
    is dropped (neither trained nor evaluated on)."""
    train, held = [], {}
    for kind in kinds:
        named = named_builtin_documents(kind)
        if kind == "books":
            cuts = [book_cut(text) for _, text in named]
            train += [text[:cut] for (_, text), cut in zip(named, cuts)]
            held[kind] = [(f"{name}[{cut}:]", text[cut:]) for (name, text), cut in zip(named, cuts)]
            continue
        groups = overlap_groups([text for _, text in named])
        out = {i for k, group in enumerate(groups) if k % HOLDOUT_EVERY == HOLDOUT_EVERY // 2 for i in group}
        train += [text for i, (_, text) in enumerate(named) if i not in out]
        held[kind] = [named[i] for i in sorted(out)]
    seen = {r for text in train for r in word_runs(text)}
    shares = {name: overlap(text, seen) for docs in held.values() for name, text in docs}
    dropped = [(name, share) for name, share in shares.items() if share > OVERLAP_LIMIT]
    held = {kind: [(n, t) for n, t in docs if shares[n] <= OVERLAP_LIMIT] for kind, docs in held.items()}
    return Split(train, held, dropped)


def train_tokenizer(docs: list[str], out: Path, vocab_size: int) -> Tokenizer:
    """LLaMa-2's kind of tokenizer, trained on ``docs`` plus PROBE_COPIES copies of the passkey prompt (as many as
    the training mix holds passkey documents: its words become whole pieces, and the shortest prompt shorter):
    sentencepiece BPE with byte fallback (newlines become <0x0A> as in LLaMa-2), digits split (a 5-digit key is
    5 tokens), text kept verbatim (identity normalisation, whitespace kept: code indentation),
    unk/bos/eos = 0/1/2. Writes ``out/tokenizer.model`` and a ``tokenizer_config.json`` for transformers."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    probe = PASSKEY_TEMPLATE.format(context=FILLER + " " + PASSKEY_LINE.format(key=12345), question=PASSKEY_QUESTION)
    lines = [line for doc in [*docs, *[probe] * PROBE_COPIES] for line in doc.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out / "tokenizer"), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        max_sentence_length=16384, num_threads=1, minloglevel=2)
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    write_json(out / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                               "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                                               "add_eos_token": False, "legacy": False})
    return load_tokenizer(out)


def token_stream(docs: list[str], tok: Tokenizer, seed: int = 0) -> np.ndarray:
    """BOS doc EOS BOS doc EOS ... (int32), the documents in a seeded random order."""
    parts = []
    for i in np.random.default_rng(seed).permutation(len(docs)):
        parts += [np.asarray(tok.encode(docs[i], add_bos=True), dtype=np.int32), np.array([tok.eos_id], np.int32)]
    return np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class Window:
    """A held-out evaluation window: BOS and ``len(ids) - 1`` tokens of its kind's held-out text, which come from
    ``pieces``: [document, token offset in it, tokens]."""
    kind: str
    ids: np.ndarray
    pieces: list[list]


def heldout_windows(held: dict[str, list[tuple[str, str]]], tok: Tokenizer, tokens: int,
                    per_kind: int) -> list[Window]:
    """Up to ``per_kind`` windows of exactly ``tokens`` tokens (BOS first) of each kind, none overlapping another.
    A kind's held-out documents, in order, are joined (a blank line between) into units, each closed as soon as it
    holds one window; the windows are ``data.sample_windows``' of the units (round k takes the k-th window of
    every unit long enough), so they come from different documents first."""
    blank = tok.encode("\n\n", add_bos=False)
    out = []
    for kind, docs in held.items():
        units: list[tuple[list[int], list[tuple[str, int, int]]]] = [([], [])]  # (ids, (name, start, end) per doc)
        for name, text in docs:
            ids, where = units[-1]
            if ids:
                ids += blank
            piece = tok.encode(text, add_bos=False)
            where.append((name, len(ids), len(ids) + len(piece)))
            ids += piece
            if len(ids) >= tokens - 1:
                units.append(([], []))
        sizes = [len(ids) for ids, _ in units]
        found = min(per_kind, sum(n // (tokens - 1) for n in sizes))
        for unit, offset in (sample_windows(sizes, found, tokens - 1) if found else []):
            ids, where = units[unit]
            end = offset + tokens - 1
            pieces = [[name, max(start, offset) - start, min(stop, end) - max(start, offset)]
                      for name, start, stop in where if start < end and stop > offset]
            out.append(Window(kind, np.asarray([tok.bos_id, *ids[offset:end]], dtype=np.int64), pieces))
    if not out:
        raise RopeliteError(f"no held-out text reaches {tokens} tokens")
    return out


def window_overlaps(windows: list[Window], tok: Tokenizer, train: list[str]) -> list[float]:
    """Each window's ``overlap`` with the training texts: the share of its 12-word runs seen in training."""
    seen = {r for text in train for r in word_runs(text)}
    return [overlap(tok.decode(w.ids[1:].tolist()), seen) for w in windows]


# ----------------------------------------------------------------------------------------------------------------
# Training data: passkey documents, mixed blocks, pretraining rows, the finetuning stream
# ----------------------------------------------------------------------------------------------------------------

def answer_ids(tok: Tokenizer, key: int) -> list[int]:
    """The tokens of ' K.' as they follow the prompt's 'The pass key is' (sentencepiece: ▁ 1 2 3 4 5 .)."""
    stem = tok.encode(PASSKEY_PREFIX, add_bos=False)
    full = tok.encode(f"{PASSKEY_PREFIX} {key}.", add_bos=False)
    if full[:len(stem)] != stem:
        raise RopeliteError("this tokenizer merges the passkey answer into the prompt's last word")
    return full[len(stem):]


class PasskeyDocuments:
    """Passkey training documents: ``ropelite.haystack``'s prompt (plain, the filler) at a length and depth, the
    answer and EOS, all within ``length`` tokens; the answer's span is returned for its loss weight."""

    def __init__(self, tok: Tokenizer, longest: int):
        self.tok = tok
        self.room = len(answer_ids(tok, KEY_RANGE[0])) + 1                        # answer + EOS
        # built long enough for any prompt: rows too short for one simply hold none (``shortest``)
        self.hay = build_haystack(functools.partial(filler_ids, tok), tok, [max(longest, 1024)], PASSKEY_TEMPLATE,
                                  PASSKEY_QUESTION, PASSKEY_PREFIX, PASSKEY_LINE.format(key=KEY_RANGE[0]),
                                  self.room, chat=False)
        self.shortest = len(self.hay.before) + len(self.hay.after) + self.room + len(
            self.hay.needle_ids(PASSKEY_LINE.format(key=KEY_RANGE[0]), 1)) + 1

    def document(self, key: int, length: int, depth: float) -> tuple[list[int], slice]:
        """(ids, answer span) of a document of at most ``length`` tokens, the key at ``depth`` percent."""
        ids, *_ = self.hay.prompt(length, depth, PASSKEY_LINE.format(key=key))
        answer = answer_ids(self.tok, key)
        return [*ids, *answer, self.tok.eos_id], slice(len(ids), len(ids) + len(answer))


@dataclasses.dataclass(frozen=True)
class Mix:
    """What the rows are: shares of passkey documents and copy rows (the rest is text), the passkey documents'
    loss weight on their answer tokens, and a curriculum: the longest passkey document grows linearly from
    ``curriculum_start`` tokens to the row length over the first ``curriculum`` rows (0 = none)."""
    p_passkey: float = 0.4
    p_copy: float = 0.1
    answer_weight: float = 10.0
    curriculum: int = 0
    curriculum_start: int = 48


TEXT_ONLY = Mix(p_passkey=0.0, p_copy=0.0)


def mixed_block(rng: np.random.Generator, passkey: PasskeyDocuments, length: int, mix: Mix, longest: int,
                text: Callable[[np.random.Generator, int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ids (length,) int64, loss weights (length,) float32) of one block: with probability ``mix.p_passkey`` a
    passkey document of uniform length in [shortest, ``longest``], random key and depth, its answer tokens
    weighted ``mix.answer_weight``, then text; with ``mix.p_copy`` a text segment of 8..length/2 tokens tiled
    over the block; else ``length`` tokens of text. ``text(rng, n)`` gives the next n text tokens."""
    weights = np.ones(length, dtype=np.float32)
    u = rng.random()
    if u < mix.p_passkey and passkey.shortest <= length:
        key = int(rng.integers(*KEY_RANGE))
        size = int(rng.integers(passkey.shortest, longest + 1))
        ids, span = passkey.document(key, size, 100 * float(rng.random()))
        weights[span] = mix.answer_weight
        return np.concatenate([np.asarray(ids, np.int64), text(rng, length - len(ids))]), weights
    if u < mix.p_passkey + mix.p_copy:
        return np.resize(text(rng, int(rng.integers(8, length // 2 + 1))), length), weights
    return text(rng, length), weights


class MixedRows:
    """Pretraining rows: row i (of ``length`` tokens) is a pure function of (seed, i), ``mixed_block`` with its text
    from a random offset of the stream and its passkey documents no longer than the curriculum allows. ``batch``
    returns (ids, loss weights)."""

    def __init__(self, stream: np.ndarray, passkey: PasskeyDocuments, length: int, mix: Mix, seed: int):
        self.stream, self.passkey, self.length, self.mix, self.seed = stream, passkey, length, mix, seed

    def longest_passkey(self, i: int) -> int:
        m = self.mix
        if i >= m.curriculum:
            return max(self.passkey.shortest, self.length)
        grown = m.curriculum_start + (self.length - m.curriculum_start) * i / m.curriculum
        return max(self.passkey.shortest, min(self.length, round(grown)))

    def text(self, rng: np.random.Generator, n: int) -> np.ndarray:
        start = int(rng.integers(self.stream.size))
        return self.stream[(start + np.arange(n)) % self.stream.size].astype(np.int64)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (length,), weights (length,))."""
        return mixed_block(np.random.default_rng([self.seed, i]), self.passkey, self.length, self.mix,
                           self.longest_passkey(i), self.text)

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.row(first + j) for j in range(count)]
        return torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))


def finetune_stream(text: np.ndarray, passkey: PasskeyDocuments, block: int, mix: Mix, seed: int,
                    tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The finetuning token stream, (ids (tokens,) int64, loss weights (tokens,) float32): ``tokens // block``
    ``mixed_block``s of ``block`` = L tokens, block b drawn from (seed, b), their text read in order from the
    start of ``text`` (the training stream in the seed's document order; wrapping round if it runs out), their
    passkey documents of at most L tokens (uniform in [shortest, L], pretraining's lengths after its curriculum).
    Nothing in it depends on the row length: rows of L or of 8L are cuts of this one stream (``StreamRows``), and
    a passkey document never straddles a multiple of L, so each is whole in a row of either arm."""
    if tokens % block:
        raise RopeliteError(f"a stream of {tokens} tokens does not split into blocks of {block}")
    cursor = 0

    def read(rng: np.random.Generator, n: int) -> np.ndarray:
        nonlocal cursor
        out = text[(cursor + np.arange(n)) % text.size].astype(np.int64)
        cursor += n
        return out

    blocks = [mixed_block(np.random.default_rng([seed, b]), passkey, block, mix, block, read)
              for b in range(tokens // block)]
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


class StreamRows:
    """Rows of ``length`` tokens cut from one stream in order: row i is tokens [i*length, (i+1)*length)."""

    def __init__(self, ids: np.ndarray, weights: np.ndarray, length: int):
        if ids.shape != weights.shape or ids.size % length:
            raise RopeliteError(f"a stream of {ids.size} tokens ({weights.size} weights) does not cut into rows "
                                f"of {length}")
        self.ids, self.weights, self.length = ids, weights, length

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = first * self.length, (first + count) * self.length
        if stop > self.ids.size:
            raise RopeliteError(f"rows {first}..{first + count - 1} run past the stream's {self.ids.size} tokens")
        shape = (count, self.length)
        return (torch.from_numpy(self.ids[start:stop].reshape(shape)),                      # (count, length)
                torch.from_numpy(self.weights[start:stop].reshape(shape)))


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Recipe:
    """One training run: ``steps`` optimizer steps of ``sequences`` x ``length`` tokens, AdamW (0.9, 0.95), no
    weight decay, clip 1, linear warmup then ``schedule`` (cosine floored at ``min_lr_ratio`` x peak, or linear
    to 0 as YaRN), rows of ``mix`` from data seed ``seed``."""
    length: int
    sequences: int
    steps: int
    lr: float
    warmup: int
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    mix: Mix = Mix()
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.steps * self.sequences * self.length

    def lr_at(self, step: int) -> float:
        return learning_rate(step, self.lr, self.warmup, self.steps, self.schedule, self.min_lr_ratio)

    def at_length(self, length: int) -> "Recipe":
        """The same token budget at another length: tokens per step kept, so sequences scale as 1/length
        (the seed paper's 4K vs 32K: same steps, same schedule, same data seed)."""
        per_step = self.sequences * self.length
        if per_step % length:
            raise RopeliteError(f"{per_step} tokens per step do not split into rows of {length}")
        return dataclasses.replace(self, length=length, sequences=per_step // length)

    def record(self, config: LlamaConfig, init: str, model: str | None, data: dict) -> dict:
        """config.json's ``ropelite`` record of a model trained by this recipe (``training.trained_record``)."""
        return trained_record(config, length=self.length, sequences_per_step=self.sequences, step=self.steps,
                              steps=self.steps, lr=self.lr, warmup=self.warmup, schedule=self.schedule,
                              min_lr_ratio=self.min_lr_ratio, init=init, model=model,
                              data={**data, "seed": self.seed, "mix": dataclasses.asdict(self.mix)})


def weighted_nll(model: Llama, ids: torch.Tensor, weights: torch.Tensor,
                 chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, plain NLL), both summed over the next-token targets: sum_t w_t NLL_t, ``weights[:, t]``
    being the weight of predicting ``ids[:, t]`` (a row's first token is no target). One pass through the blocks;
    for each weight w other than 1 (the passkey answers' 10), ``model.py``'s chunked loss again on the positions
    of that weight, gathered first so that no logits are made for the others, counted w - 1 more times. With
    every weight 1 it is ``model.nll``."""
    h = model.hidden_states(ids)[:, :-1]                                               # (B, T-1, C)
    targets, w = ids[:, 1:], weights[:, 1:]                                            # (B, T-1) each
    plain = LinearCrossEntropy.apply(h, model.lm_head.weight, targets, chunk_size, False)
    loss = plain
    for value in torch.unique(w).tolist():
        if value != 1:
            at = w == value
            h_at, y_at = h[at][None], targets[at][None]                                # (1, N, C), (1, N)
            loss = loss + (value - 1) * LinearCrossEntropy.apply(h_at, model.lm_head.weight, y_at, chunk_size, False)
    return loss, plain


def train(model: Llama, rows, recipe: Recipe, on_step: Callable[[dict], None] | None = None,
          dtype: torch.dtype = torch.float32) -> list[dict]:
    """Run ``recipe`` on ``model`` (in place): step s is train.py's ``optimizer_step`` (``dtype``: its autocast) on
    the loss ``weighted_nll`` of ``rows.batch(s * sequences, sequences)`` (``MixedRows`` or ``StreamRows``);
    returns one log row per step (plain loss, lr, tokens so far)."""
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, recipe.lr, (0.9, 0.95), 0.0, device)
    model.train()
    log = []
    for step in range(recipe.steps):
        lr = recipe.lr_at(step)
        ids, weights = rows.batch(step * recipe.sequences, recipe.sequences)            # (B, length) each
        loss, _ = optimizer_step(model, optimizer, [(ids.to(device), weights.to(device))], lr,
                                 n_predicted=ids.shape[0] * (ids.shape[1] - 1), loss_fn=weighted_nll, dtype=dtype,
                                 clip=1.0)
        log.append({"step": step + 1, "loss": round(loss, 5), "lr": lr,
                    "tokens": (step + 1) * recipe.sequences * recipe.length})
        if on_step is not None:
            on_step(log[-1])
    model.eval()
    return log


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def window_rows(model: Llama, window: np.ndarray, lengths: list[int], L: int) -> list[dict]:
    """Per length n, from ONE forward of the window (causal: the first n tokens' logits and attention do not
    depend on later tokens): ``nll`` the mean NLL of the first n tokens (the truncate protocol), ``nll_last_L``
    the mean NLL of the last L of them with the whole prefix as context (a break past L cannot hide in it, where
    the truncate protocol averages the first L, hardest tokens into every length), ``last_query_entropy`` the
    mean over layers and heads of the entropy (nats) of query n-1's attention over keys 0..n-1 (the row Figure 2
    of the seed paper plots). Logits, softmax and entropy in float32 whatever dtype the weights are."""
    if list(lengths) != sorted(set(lengths)):
        raise RopeliteError(f"window_rows takes distinct lengths in increasing order, got {lengths}")
    T = lengths[-1]
    x = torch.as_tensor(window[:T], dtype=torch.long).unsqueeze(0)                     # (1, T)
    rows = {}

    def keep(layer: int, positions: torch.Tensor, probs: torch.Tensor) -> None:
        rows.setdefault(layer, probs[0].float())              # (H, len(lengths), T): rows in increasing position

    queries = torch.tensor([n - 1 for n in lengths])
    h = model.hidden_states(x, on_attention=keep, attention_rows=queries)[0, :-1]      # (T-1, C)
    logits = h.float() @ model.lm_head.weight.float().T                               # (T-1, V)
    nll = F.cross_entropy(logits, x[0, 1:], reduction="none").double()                # (T-1,): predicts token t+1
    per_row = torch.stack([entropy(rows[layer]) for layer in sorted(rows)])           # (layers, H, len(lengths))
    return [{"length": n, "nll": float(nll[:n - 1].mean()), "nll_last_L": float(nll[max(0, n - 1 - L):n - 1].mean()),
             "last_query_entropy": float(per_row[:, :, j].mean())} for j, n in enumerate(lengths)]


def count_model_nll(stream: np.ndarray, vocab: int, window: np.ndarray, lengths: list[int]) -> list[dict]:
    """Unigram (add-1/2) and bigram count models of the training stream, the mean NLL of the first n tokens of
    ``window`` per length (the truncate protocol): the floor a trained LLaMa must beat to be called a language
    model. The bigram is smoothed towards the unigram with a Dirichlet prior of weight 1:
    p(b|a) = (c(a,b) + p(b)) / (c(a) + 1)."""
    uni = (np.bincount(stream, minlength=vocab) + 0.5) / (stream.size + 0.5 * vocab)
    pairs = np.bincount(stream[:-1].astype(np.int64) * vocab + stream[1:], minlength=vocab * vocab)
    pairs = pairs.reshape(vocab, vocab)                                                # (a, b)
    first = pairs.sum(1)
    rows = []
    for n in lengths:
        a, b = window[:n - 1], window[1:n]
        rows.append({"length": n, "unigram": float(-np.log(uni[b]).mean()),
                     "bigram": float(-np.log((pairs[a, b] + uni[b]) / (first[a] + 1)).mean())})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Intervals and verdicts: rules fixed before any result is seen
# ----------------------------------------------------------------------------------------------------------------

BOOTSTRAP_SEED = 0     # every bootstrap interval is drawn with this seed: a rerun prints the same intervals


@dataclasses.dataclass(frozen=True)
class Metric:
    """A quantity the verdicts are about. Its unit values are (finetune seeds, units) arrays: passkey trials
    (0/1 passed, or the answer's entropy) or held-out windows (mean NLL, or the last query's entropy).
    ``better``: the way claim 1 says the 8L finetune moves it ("lower" or "higher"). ``near``: claim 2's margin,
    on the difference of the means (for a perplexity: of the mean NLLs, so the ratio of perplexities lies within
    exp(+-near)). ``rate``: a pass rate, with Wilson's interval of the pooled k/n; else a mean with a bootstrap
    interval (``exp``: reported as exp(mean), a perplexity)."""
    key: str
    label: str
    better: str
    near: float
    rate: bool = False
    exp: bool = False

    def interval(self, values) -> Interval:
        """The pooled estimate over every seed and unit with its 95 % interval."""
        x = np.asarray(values, dtype=np.float64)
        if self.rate:
            return wilson(int(round(x.sum())), x.size)
        return bootstrap_mean(x, seed=BOOTSTRAP_SEED, transform=math.exp if self.exp else None)

    def difference(self, values, reference) -> Interval:
        """values - reference on the same units (reference: one model, 1-D; values: seeds x units), its mean and
        bootstrap interval over seeds and units; for a perplexity the ratio exp(mean NLL difference)."""
        x = np.atleast_2d(np.asarray(values, dtype=np.float64)) - np.asarray(reference, dtype=np.float64)[None]
        return bootstrap_mean(x, seed=BOOTSTRAP_SEED, transform=math.exp if self.exp else None)


METRICS = {
    "answer_entropy": Metric("answer_entropy", "passkey answer entropy (nats)", "lower", 0.25),
    "passed": Metric("passed", "passkey pass rate", "higher", 0.15, rate=True),
    "nll_last_L": Metric("nll_last_L", "last-L perplexity", "lower", math.log(1.1), exp=True),
    "last_query_entropy": Metric("last_query_entropy", "last query's entropy on text (nats)", "lower", 0.25),
}
HOLDS, FAILS, UNCLEAR = "holds", "does not hold", "unclear"


def claim_1(metric: Metric, long: Interval, short: Interval, free: Interval) -> str:
    """The paper's first claim at one length, that the 8L finetune (``long``) is better than both the L finetune
    (``short``) and the training-free model (``free``) in the way ``metric.better`` says (lower entropy, higher
    pass rate, lower perplexity): holds when both pairs of intervals separate that way; does not hold when
    either separates the other way; unclear otherwise (an overlap: the data cannot tell)."""
    worse = "higher" if metric.better == "lower" else "lower"
    ways = [compare(long, short), compare(long, free)]
    if all(w == metric.better for w in ways):
        return HOLDS
    return FAILS if worse in ways else UNCLEAR


def claim_2(metric: Metric, difference: Interval) -> str:
    """The paper's second claim at one length, that the L finetune stays near the training-free model: holds
    when the 95 % interval of their difference (``Metric.difference``) lies inside +-``metric.near`` (for a
    perplexity: the ratio inside exp(+-near)); does not hold when it lies wholly outside that band; unclear
    otherwise, and when there is no interval."""
    if not difference.known:
        return UNCLEAR
    low, high = (-metric.near, metric.near) if not metric.exp else (math.exp(-metric.near), math.exp(metric.near))
    if low <= difference.low and difference.high <= high:
        return HOLDS
    return FAILS if difference.high < low or difference.low > high else UNCLEAR
