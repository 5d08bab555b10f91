"""The seed paper's third finding in miniature (Zhong et al. 2024, §4.3, Figure 4 e-f): "we finetune models on 4K
and 32K training lengths with the same tokens on NTK ... models trained in more extended contexts exhibited
significantly lower attention uncertainty". No short-context LLaMa exists offline, so the miniature trains its
own; ``ablation.py`` is the script around these pieces.

- Text: the built-in books, prose and code, split into training and held-out documents (``split_documents``);
  a LLaMa-2-style sentencepiece ``tokenizer.model`` trained on the training text (``train_tokenizer``).
- Rows (``MixedRows``): text from the training stream; passkey documents, the very prompt the evaluation asks
  (``ropelite.haystack``'s passkey template and filler) followed by the answer " K." and EOS, their answer tokens
  weighted up in the loss; copy rows (a text segment tiled over the row, the repeated structure that makes
  induction heads form early). A row is a pure function of (seed, index).
- Training (``train``): train.py's own optimizer step (``ropelite.trainer.optimizer_step``: AdamW, clip 1) with
  ``ropelite.training``'s schedule, and as its loss ``model.py``'s (``LinearCrossEntropy``) with the passkey
  answer weighted (``weighted_nll``). A ``Recipe`` holds the tokens per step as sequences x length, so the L and
  8L finetunes of one budget differ only in how it is cut.
- Evaluation: perplexity (the truncate protocol, and the last L tokens of each length, which a break past L
  cannot hide in), the last query's attention entropy, and unigram / bigram count models as a floor of what
  "a language model" means here. The passkey grid is needle.py's (same prompt, scorer and Algorithm 1 entropy).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .attention import Variant, last_rows
from .data import builtin_documents
from .errors import RopeliteError
from .haystack import (FILLER, PASSKEY_LINE, PASSKEY_PREFIX, PASSKEY_QUESTION, PASSKEY_TEMPLATE, build_haystack,
                       filler_ids)
from .io import write_json
from .loss import LinearCrossEntropy
from .model import Llama, LlamaConfig
from .parallel import make_optimizer
from .ppl import perplexity
from .stats import entropy
from .tokenizer import Tokenizer, load_tokenizer
from .trainer import optimizer_step
from .training import learning_rate, trained_record

HOLDOUT_EVERY = 10     # every 10th prose topic / code module is held out ...
BOOK_HELD_OUT = 0.1    # ... and the last 10 % of each book
KEY_RANGE = (10_000, 100_000)
PROBE_COPIES = 200


# ----------------------------------------------------------------------------------------------------------------
# Text and tokenizer
# ----------------------------------------------------------------------------------------------------------------

def split_documents(kinds: tuple[str, ...] = ("books", "prose", "code")) -> tuple[list[str], dict[str, list[str]]]:
    """(training documents, held-out documents by kind). Prose topics and code modules: every HOLDOUT_EVERY-th
    (sorted order) is held out; books: the last BOOK_HELD_OUT of each, cut at a paragraph break."""
    train, held = [], {}
    for kind in kinds:
        docs = builtin_documents(kind)
        if kind == "books":
            cuts = [book.rfind("\n\n", 0, round(len(book) * (1 - BOOK_HELD_OUT))) for book in docs]
            train += [book[:cut] for book, cut in zip(docs, cuts)]
            held[kind] = [book[cut:].lstrip() for book, cut in zip(docs, cuts)]
        else:
            train += [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY != HOLDOUT_EVERY // 2]
            held[kind] = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY == HOLDOUT_EVERY // 2]
    return train, held


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


def heldout_windows(held: dict[str, list[str]], tok: Tokenizer, tokens: int, per_kind: int) -> list[np.ndarray]:
    """Up to ``per_kind`` evaluation documents of exactly ``tokens`` tokens (BOS first) from each kind: the kind's
    held-out documents joined in order (blank line between) until they reach ``tokens``, then cut."""
    out = []
    for docs in held.values():
        group, found = [], 0
        for doc in docs:
            group.append(doc)
            ids = tok.encode("\n\n".join(group), add_bos=True)
            if len(ids) >= tokens:
                out.append(np.asarray(ids[:tokens], dtype=np.int64))
                group, found = [], found + 1
                if found == per_kind:
                    break
    if not out:
        raise RopeliteError(f"no held-out document reaches {tokens} tokens")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training rows: text, passkey documents, copy rows
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


class MixedRows:
    """Row i (of ``length`` tokens) is a pure function of (seed, i): a passkey document of random length, key and
    depth followed by text; a copy row (a random text segment of 8..length/2 tokens tiled); or ``length`` tokens
    of the training stream from a random offset. ``batch`` also returns the mask of passkey answer tokens."""

    def __init__(self, stream: np.ndarray, passkey: PasskeyDocuments, length: int, mix: Mix, seed: int):
        self.stream, self.passkey, self.length, self.mix, self.seed = stream, passkey, length, mix, seed

    def longest_passkey(self, i: int) -> int:
        m = self.mix
        grown = self.length if i >= m.curriculum else m.curriculum_start + (self.length - m.curriculum_start) * i / m.curriculum
        return max(self.passkey.shortest, min(self.length, round(grown)))

    def text(self, rng: np.random.Generator, n: int) -> np.ndarray:
        start = int(rng.integers(self.stream.size))
        return self.stream[(start + np.arange(n)) % self.stream.size].astype(np.int64)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (length,), answer mask (length,))."""
        rng = np.random.default_rng([self.seed, i])
        answer = np.zeros(self.length, dtype=bool)
        u = rng.random()
        if u < self.mix.p_passkey and self.passkey.shortest <= self.length:
            key = int(rng.integers(*KEY_RANGE))
            size = int(rng.integers(self.passkey.shortest, self.longest_passkey(i) + 1))
            ids, span = self.passkey.document(key, size, 100 * float(rng.random()))
            answer[span] = True
            return np.concatenate([np.asarray(ids, np.int64), self.text(rng, self.length - len(ids))]), answer
        if u < self.mix.p_passkey + self.mix.p_copy:
            return np.resize(self.text(rng, int(rng.integers(8, self.length // 2 + 1))), self.length), answer
        return self.text(rng, self.length), answer

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.row(first + j) for j in range(count)]
        return torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))


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


def weighted_nll(model: Llama, ids: torch.Tensor, answer: torch.Tensor, weight: float,
                 chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, plain NLL), both summed over the next-token targets: the NLL with each passkey answer
    token's NLL counted ``weight`` times (more copy targets per token, so retrieval forms sooner). One pass
    through the blocks; the answer term is ``model.py``'s chunked loss again on the answer positions only,
    gathered first so that no logits are made for the other positions. At ``weight`` 1 it is ``model.nll``."""
    h = model.hidden_states(ids)[:, :-1]                                               # (B, T-1, C)
    targets = ids[:, 1:]                                                               # (B, T-1)
    plain = LinearCrossEntropy.apply(h, model.lm_head.weight, targets, chunk_size, False)
    loss = plain
    counted = answer[:, 1:]                                                 # (B, T-1): predicts an answer token
    if weight != 1 and bool(counted.any()):
        h_answer, y_answer = h[counted][None], targets[counted][None]                   # (1, N, C), (1, N)
        loss = loss + (weight - 1) * LinearCrossEntropy.apply(h_answer, model.lm_head.weight, y_answer, chunk_size,
                                                              False)
    return loss, plain


def train(model: Llama, rows: MixedRows, recipe: Recipe, on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ``recipe`` on ``model`` (in place), each step train.py's ``optimizer_step`` on the loss
    ``weighted_nll`` with the recipe's answer weight; returns one log row per step (plain loss, lr, tokens so
    far)."""
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, recipe.lr, (0.9, 0.95), 0.0, device)
    loss_fn = functools.partial(weighted_nll, weight=recipe.mix.answer_weight)
    model.train()
    log = []
    for step in range(recipe.steps):
        lr = recipe.lr_at(step)
        ids, answer = rows.batch(step * recipe.sequences, recipe.sequences)             # (B, length) each
        loss, _ = optimizer_step(model, optimizer, [(ids.to(device), answer.to(device))], lr,
                                 n_predicted=ids.shape[0] * (ids.shape[1] - 1), loss_fn=loss_fn, clip=1.0)
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
def tail_perplexity(model: Llama, docs: list[np.ndarray], length: int, window: int) -> float:
    """exp(mean over documents of the mean NLL of the last ``window`` tokens of the first ``length``), the whole
    prefix as context. The truncate protocol averages the first L tokens (the hardest, just after BOS) into every
    length, which hides a model that breaks past L; this does not."""
    means = []
    for ids in docs:
        x = torch.as_tensor(ids[:length], dtype=torch.long).unsqueeze(0)               # (1, length)
        labels = x.clone()
        labels[:, :max(1, length - window)] = -100
        s, n = model.nll(x, labels, chunk_size=512)
        means.append(float(s) / int(n))
    return math.exp(float(np.mean(means)))


@torch.no_grad()
def last_query_entropy(model: Llama, docs: list[np.ndarray], length: int) -> float:
    """Mean over documents, layers and heads of the entropy (nats) of the last query's attention over the first
    ``length`` tokens (the row Figure 2 of the seed paper plots)."""
    variant = Variant("", model, model.config, 0)
    return float(np.mean([float(entropy(last_rows(variant, ids[:length])).mean()) for ids in docs]))


def language_model_rows(model: Llama, docs: list[np.ndarray], lengths: list[int], L: int) -> list[dict]:
    """Per length: truncate-protocol perplexity, perplexity of the last L tokens, last-query entropy."""
    return [{"length": n, "ppl": perplexity(model, docs, n)["ppl"], "ppl_last_L": tail_perplexity(model, docs, n, L),
             "last_query_entropy": last_query_entropy(model, docs, n), "uniform_entropy": math.log(n)}
            for n in lengths]


def count_model_rows(stream: np.ndarray, vocab: int, docs: list[np.ndarray], lengths: list[int]) -> list[dict]:
    """Unigram (add-1/2) and bigram count models of the training stream, on the truncate protocol: the floor a
    trained LLaMa must beat to be called a language model. The bigram is smoothed towards the unigram with a
    Dirichlet prior of weight 1: p(b|a) = (c(a,b) + p(b)) / (c(a) + 1)."""
    uni = (np.bincount(stream, minlength=vocab) + 0.5) / (stream.size + 0.5 * vocab)
    pairs = np.bincount(stream[:-1].astype(np.int64) * vocab + stream[1:], minlength=vocab * vocab)
    pairs = pairs.reshape(vocab, vocab)                                                # (a, b)
    first = pairs.sum(1)
    rows = []
    for n in lengths:
        nll = {"unigram": [], "bigram": []}
        for ids in docs:
            a, b = ids[:n - 1], ids[1:n]
            nll["unigram"].append(-np.log(uni[b]).mean())
            nll["bigram"].append(-np.log((pairs[a, b] + uni[b]) / (first[a] + 1)).mean())
        rows.append({"length": n, **{f"{k}_ppl": math.exp(float(np.mean(v))) for k, v in nll.items()}})
    return rows


def per_length(cells: list[dict]) -> list[dict]:
    """Passkey cells (length, depth, pass_rate, trials, entropy) summarised per length over depths and trials."""
    out = []
    for n in sorted({c["length"] for c in cells}):
        row = [c for c in cells if c["length"] == n]
        trials = sum(c["trials"] for c in row)
        out.append({"length": n, "trials": trials,
                    "pass_rate": sum(c["pass_rate"] * c["trials"] for c in row) / trials,
                    "entropy": sum(c["entropy"] * c["trials"] for c in row) / trials})
    return out
