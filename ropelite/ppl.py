"""Perplexity of long documents, the two protocols of the long-context literature.

- ``truncate`` (PI / YaRN / the seed paper): the first L tokens of each document with at least L tokens (BOS
  first when the tokenizer adds one), the mean NLL over its L-1 predicted tokens, PPL = exp(mean over documents).
- ``sliding``: the same L tokens read through windows of W tokens moved by S; every token is scored exactly
  once, by the first window that reaches it, with the tokens before it in that window as context. As in Hugging
  Face's "perplexity of fixed-length models", except that the last window also keeps W tokens of context.

Each perplexity carries a 95 % bootstrap interval (``perplexity_interval``) over the units that score separate
tokens: documents under truncate, windows under sliding; with fewer than 3 there is none, and the row gives n.

The loss is ``Llama.nll``: hidden states on the fast attention path, logits a chunk of positions at a time, so
memory is O(L * hidden + chunk * vocab), never the L x V logits.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .errors import RopeliteError
from .model import Llama
from .rope import RopeConfig
from .stats import Interval, bootstrap_mean

PROTOCOLS = ("truncate", "sliding")


def check_window(window: int, stride: int) -> None:
    """The sliding protocol's one rule: a window of at least 2 tokens, moved by 1 <= S <= W."""
    if not 1 <= stride <= window or window < 2:
        raise RopeliteError(f"the stride ({stride}) must be between 1 and the window ({window}, at least 2), "
                            "or some tokens would never be scored")


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over tokens 0..n_tokens-1.

    The first window scores positions 1..W-1 (position 0 has nothing to predict it); each next window ends S
    tokens later (or at the end) and scores only the positions the previous one did not reach, so the counts add
    up to n_tokens - 1. Every window holds W tokens, hence every scored token has at least W - S tokens of
    context. A window cannot predict its own first token, so S = W (windows side by side) advances by W - 1:
    each window starts on the last token of the one before. A document of at most W tokens is one window: the
    truncate protocol."""
    check_window(window, stride)
    if n_tokens <= window:
        return [(0, n_tokens, 1)]
    step = min(stride, window - 1)
    windows, scored_to = [(0, window, 1)], window
    while scored_to < n_tokens:
        end = min(scored_to + step, n_tokens)
        windows.append((end - window, end, scored_to))
        scored_to = end
    return windows


@torch.no_grad()
def window_sums(model: Llama, ids: torch.Tensor, window: int, stride: int, chunk_size: int = 512,
                on_tokens: Callable[[int], None] | None = None, rope: RopeConfig | None = None,
                ) -> list[tuple[float, int]]:
    """(sum of NLL, number of scored tokens) of each window of one document ``ids`` (T,), read with
    ``sliding_windows``. ``on_tokens(n)`` is told how many tokens each forward pass read (for a progress bar);
    ``rope`` is the variant to run (default: the model's own)."""
    scored = []
    for begin, end, first in sliding_windows(len(ids), window, stride):
        x = ids[begin:end].unsqueeze(0)                                              # (1, w)
        labels = x.clone()
        labels[:, :first - begin] = -100  # context: predicted by an earlier window, or position 0
        s, n = model.nll(x, labels, chunk_size=chunk_size, rope=rope)
        scored.append((float(s), int(n)))
        if on_tokens is not None:
            on_tokens(end - begin)
    return scored


def perplexity(model: Llama, docs: list[np.ndarray], length: int, protocol: str = "truncate",
               window: int | None = None, stride: int | None = None, chunk_size: int = 512,
               on_tokens: Callable[[int], None] | None = None, rope: RopeConfig | None = None) -> dict:
    """PPL of the first ``length`` tokens of each document (all must have that many), averaged per document:
    exp(mean over documents of each document's mean NLL). ``window``/``stride`` are the sliding protocol's.
    Returns {"nll", "ppl", "docs", "tokens"} (tokens = scored tokens), the units behind them ("doc_nll": each
    document's mean NLL; "window_nll": per document, each window's mean NLL over the tokens it scores;
    "window_tokens": how many that is, the same for every document) and the PPL's 95 % interval
    (``perplexity_interval``: ppl_low, ppl_high, ppl_n, ppl_unit)."""
    if protocol not in PROTOCOLS:
        raise RopeliteError(f"unknown protocol '{protocol}': choose one of {', '.join(PROTOCOLS)}")
    if protocol == "truncate":
        window = stride = length
    elif window is None or stride is None:
        raise RopeliteError("the sliding protocol needs a window and a stride")
    short = [len(d) for d in docs if len(d) < length]
    if short or not docs:
        raise RopeliteError(f"{len(short)} of {len(docs)} documents have fewer than {length} tokens")
    device = next(model.parameters()).device
    per_window = []
    for ids in docs:
        x = torch.as_tensor(np.asarray(ids[:length], dtype=np.int64), device=device)
        per_window.append(window_sums(model, x, window, stride, chunk_size, on_tokens, rope))
    doc_nll = [sum(s for s, _ in w) / sum(n for _, n in w) for w in per_window]
    nll = float(np.mean(doc_nll))
    window_tokens = [n for _, n in per_window[0]]  # every document reads the same `length` tokens: same windows
    window_means = [[s / n for s, n in w] for w in per_window]
    interval = perplexity_interval(window_means, window_tokens)
    return {"nll": nll, "ppl": math.exp(nll), "ppl_low": interval.low, "ppl_high": interval.high,
            "ppl_n": interval.n, "ppl_unit": "documents" if len(window_tokens) == 1 else "windows",
            "docs": len(docs), "tokens": len(docs) * sum(window_tokens),
            "doc_nll": doc_nll, "window_nll": window_means, "window_tokens": window_tokens}


def perplexity_interval(window_nll: list[list[float]], window_tokens: list[int], seed: int = 0) -> Interval:
    """PPL with its seeded percentile-bootstrap 95 % interval (ropelite.stats.bootstrap_mean) over the units
    that score separate tokens: the documents under truncate (one window each), the windows under sliding.

    The mean NLL is a ratio, R = sum_i s_i / sum_i n_i over the K windows of every document (window i scores n_i
    tokens whose NLL sums to s_i = n_i m_i; every document reads the same tokens, so R is also the mean over
    documents of each document's mean NLL). Windows score unequal counts (the first W - 1, the others S), so
    their plain mean NLLs are not exchangeable units: each window is the unit z_i = R + K n_i (m_i - R) / sum n,
    its influence on the ratio (the delta method), whose plain mean is R exactly. A window of average NLL is R
    whatever its size; one that departs counts by its share of the tokens. PPL = exp(mean z), and each
    resample's exp(mean) gives the interval. Under truncate every n_i is the same and z_d is the document's mean
    NLL. No interval below 3 units (``ppl_n`` says how many)."""
    m = np.asarray(window_nll, dtype=np.float64)                                      # (docs, k)
    n = np.broadcast_to(np.asarray(window_tokens, dtype=np.float64), m.shape)         # (docs, k)
    ratio = float((m * n).sum() / n.sum())
    units = ratio + m.size * n * (m - ratio) / n.sum()                                 # (docs, k)
    return bootstrap_mean(units.reshape(-1), seed=seed, transform=math.exp)


def choose_documents(doc_lengths: list[int], length: int, max_docs: int | None = None) -> list[int]:
    """Indices (in corpus order) of the documents to score at ``length``: of the ``max_docs`` longest documents
    (all when None; ties keep corpus order), those with at least ``length`` tokens. The choice does not depend
    on the other lengths asked for, and the sets are nested: when the max_docs longest all reach the longest
    length, every length scores the same documents (the PI / YaRN protocol)."""
    longest = sorted(range(len(doc_lengths)), key=lambda i: -doc_lengths[i])[:max_docs]
    return sorted(i for i in longest if doc_lengths[i] >= length)


def effective_base(rope: RopeConfig, dim: int, seq_len: int) -> float:
    """The base in use at ``seq_len``: NTK's new base, dynamic NTK's base at this length, else the pretrained
    one (PI, YaRN, llama3 rescale frequencies, not the base). Read back from theta_1 = b^(-2/d) rather than
    re-deriving each formula."""
    if rope.variant.changes_base:
        inv_freq, _ = rope.frequencies(dim, seq_len)
        return float(inv_freq[1]) ** (-dim / 2)
    return rope.theta
