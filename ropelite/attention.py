"""Attention as a distribution: the reductions behind the seed paper's Figure 2 / Table 1 and its Algorithm 1.

- Figure 2 / Table 1 (``analyze.py attention``): ``pick_samples`` cuts the samples by the one sample rule
  (``ropelite.data.sample_windows``), each a ``Sample`` that says where it comes from; for each sample,
  ``last_rows`` takes the last query's attention over every key in every layer and head; a ``Reduction`` keeps
  only running sums over samples (O(L * heads * layers) memory, never O(L^2)); ``summarize`` turns them into the numbers of ``DEFINITIONS``; ``measure`` runs
  the samples of one length for every variant, saving the sums after each sample so that a killed run resumes.
- Algorithm 1 (``needle.py``): ``EntropyMeter`` averages the entropy of the attention rows that produce each
  generated token; ``answer_with_entropy`` decodes greedily with it.

Entropies and divergences are in nats (ropelite.stats).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from .books import document_names
from .data import TEXT_SUFFIXES, sample_windows, tokenize_checked
from .errors import RopeliteError
from .io import atomic_path
from .model import Llama, LlamaConfig, generate
from .stats import (BOOTSTRAP_RESAMPLES, MIN_UNITS, NATS_PER_BIT, Interval, bootstrap_mean, entropy, js_divergence,
                    standard_error)

# What each number of ``summarize`` means; written beside the results.
DEFINITIONS = {
    "distribution": "p_{s,l,h}: softmax attention of the last query (position L-1) over keys 0..L-1, for sample s, "
                    "layer l, head h",
    "mean_distribution": "pbar = mean over (sample, layer, head) of p_{s,l,h} (Figure 2, red line)",
    "per_head_curve": "mean over samples of p_{s,l,h} for one (layer, head) (Figure 2, thin lines)",
    "js_mean_nats": "JS(pbar_variant, pbar_reference) = KL(p||m)/2 + KL(q||m)/2, m = (p+q)/2, natural log (Table 1)",
    "js_mean_nats_low": "2.5 % end of js_mean_nats' 95 % interval: a seeded percentile bootstrap over samples, "
                        "paired (the same resampled samples for the variant and the reference), moved down by the "
                        "resamples' mean lean above the estimate (bias-corrected), at least 0; null below 3",
    "js_mean_nats_high": "97.5 % end of that interval",
    "js_mean_nats_n": "samples behind js_mean_nats",
    "js_mean_bits": "js_mean_nats / ln 2",
    "js_per_distribution_nats": "mean over (sample, layer, head) of JS(p_{s,l,h} variant, p_{s,l,h} reference); "
                                "a different quantity, >= js_mean by joint convexity",
    "js_per_distribution_nats_low": "2.5 % end of its 95 % interval: a seeded percentile bootstrap of the mean over "
                                    "samples of each sample's mean over (layer, head); null below 3 samples, or when "
                                    "the reference has other layers or heads (then the value is null too)",
    "js_per_distribution_nats_high": "97.5 % end of that interval",
    "js_per_distribution_nats_n": "samples behind js_per_distribution_nats",
    "js_per_distribution_bits": "js_per_distribution_nats / ln 2",
    "entropy_per_layer": "mean over (sample, head) of -sum p ln p of p_{s,l,h}, nats",
    "entropy_per_layer_se": "per layer, the standard error over samples of each sample's mean over heads; null below "
                            "3 samples",
    "entropy": "mean over layers of entropy_per_layer, nats",
    "entropy_se": "standard error over samples of each sample's mean over (layer, head) of the entropy; null below 3",
    "entropy_n": "samples behind entropy",
    "entropy_of_mean": "-sum pbar ln pbar, nats",
    "uniform_entropy": "ln L: the entropy of uniform attention over L keys",
}


# ----------------------------------------------------------------------------------------------------------------
# Figure 2 / Table 1: the last query's attention, reduced over samples
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Variant:
    """One thing whose attention is measured: a model with a RoPE config, under a label."""
    label: str
    model: Llama
    config: LlamaConfig
    tokens: int            # index into the tokenised samples: which tokenizer's ids this model reads


def last_rows(variant: Variant, ids: np.ndarray) -> torch.Tensor:
    """(layers, heads, L) float32: the last query's attention over keys 0..L-1 in every layer and head."""
    model, c = variant.model, variant.config  # variants may share one loaded model: the RoPE is an argument
    L = len(ids)
    rows = torch.empty(c.num_hidden_layers, c.num_attention_heads, L)

    def keep(layer: int, positions: torch.Tensor, probs: torch.Tensor) -> None:
        rows[layer] = probs[0, :, 0].cpu()                  # probs (1, H, 1, L): the one row asked for

    device = next(model.parameters()).device
    with torch.no_grad():  # hidden_states: no (L, vocab) logits are ever made
        model.hidden_states(torch.as_tensor(ids, device=device).view(1, L), on_attention=keep,
                            attention_rows=torch.tensor([L - 1], device=device), rope=c.rope)
    return rows


class Reduction:
    """Running sums over samples for one variant at one length, and a few numbers per sample (for the intervals
    over samples); nothing but these is kept between samples."""

    def __init__(self, layers: int, heads: int, length: int):
        self.per_head_sum = torch.zeros(layers, heads, length, dtype=torch.float64)  # sum_s p_{s,l,h}
        self.entropy_samples = torch.zeros(0, layers, dtype=torch.float64)          # (s, layers): mean_h H(p_{s,l,h})
        self.js_samples = torch.zeros(0, layers, dtype=torch.float64)               # (s, layers): mean_h JS(p, ref)
        self.sample_means = torch.zeros(0, length, dtype=torch.float64)             # (s, L): mean_{l,h} p_{s,l,h}
        self.samples = 0

    def add(self, rows: torch.Tensor, reference: torch.Tensor | None) -> None:
        """rows, reference: (layers, heads, L) distributions of the same sample; reference None for the reference
        itself, whose JS against itself is 0."""
        self.per_head_sum += rows
        self.sample_means = torch.cat([self.sample_means, rows.double().mean((0, 1))[None]])
        self.entropy_samples = torch.cat([self.entropy_samples, entropy(rows).mean(1)[None]])
        if reference is None:
            js = torch.zeros(rows.shape[0], dtype=torch.float64)
        elif reference.shape == rows.shape:
            js = js_divergence(rows, reference).mean(1)                                # (layers,)
        else:  # another architecture: there is no (layer, head) to pair with
            js = torch.full((rows.shape[0],), float("nan"), dtype=torch.float64)
        self.js_samples = torch.cat([self.js_samples, js[None]])
        self.samples += 1

    def per_head(self) -> torch.Tensor:
        return self.per_head_sum / self.samples                                       # (layers, heads, L)

    def mean(self) -> torch.Tensor:
        return self.per_head_sum.sum((0, 1)) / (self.samples * self.per_head_sum[..., 0].numel())  # (L,)

    FIELDS = ("per_head_sum", "entropy_samples", "js_samples", "sample_means")

    def arrays(self, prefix: str) -> dict:
        return {**{f"{prefix}{name}": getattr(self, name).numpy() for name in self.FIELDS},
                f"{prefix}samples": np.array(self.samples)}

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "Reduction":
        r = cls(1, 1, 1)
        for name in cls.FIELDS:
            setattr(r, name, torch.from_numpy(arrays[f"{prefix}{name}"].copy()))
        r.samples = int(arrays[f"{prefix}samples"])
        return r


def over_samples(values: torch.Tensor) -> Interval:
    """The mean of one value per sample with its bootstrap 95 % interval over the samples (none below 3, or when
    the values are not numbers: a reference of another architecture has no per-distribution JS)."""
    x = values.numpy()
    if not np.isfinite(x).all():
        return Interval(float("nan"), None, None, len(x), "bootstrap")
    return bootstrap_mean(x)


def summarize(r: Reduction, reference: Reduction) -> dict:
    """The Table 1 numbers of one variant against the reference (see DEFINITIONS)."""
    mean = r.mean()
    js_mean = js_of_means(r, reference)
    per_dist = over_samples(r.js_samples.mean(1))                                   # (s,) -> mean over samples
    per_layer = r.entropy_samples.mean(0).tolist()
    enough = r.samples >= MIN_UNITS
    return {**js_mean.fields("js_mean_nats"), "js_mean_bits": js_mean.estimate / NATS_PER_BIT,
            **per_dist.fields("js_per_distribution_nats"),
            "js_per_distribution_bits": per_dist.estimate / NATS_PER_BIT,
            "entropy": float(np.mean(per_layer)),
            "entropy_se": standard_error(r.entropy_samples.mean(1).numpy()) if enough else None,
            "entropy_n": r.samples, "entropy_of_mean": float(entropy(mean)), "uniform_entropy": math.log(len(mean)),
            "entropy_per_layer": per_layer,
            "entropy_per_layer_se": ([standard_error(column) for column in r.entropy_samples.T.numpy()] if enough
                                     else None)}


def js_of_means(r: Reduction, reference: Reduction, seed: int = 0) -> Interval:
    """JS(pbar, pbar_reference) with a seeded, paired bootstrap 95 % interval over the samples: each resample
    draws n samples with replacement, the same ones for both sides (they read the same windows), forms both mean
    distributions and their JS. No interval below MIN_UNITS samples.

    The resamples' JS leans high: resampling adds noise to both means, and noise only ever adds divergence, so at
    a small JS (NTK or YaRN against RoPE within the pretrained length) every resample's JS can exceed the
    estimate and the plain percentile interval would lie wholly above it. The percentiles are therefore moved
    down by the bootstrap's own estimate of that lean, mean(resampled JS) - estimate (the bias-corrected
    percentile interval), and the low end is kept >= 0: the interval has the resamples' spread around the
    estimate."""
    x, y = r.sample_means, reference.sample_means                                   # (n, L) each
    n, L = x.shape
    estimate = float(js_divergence(x.mean(0), y.mean(0)))
    if n < MIN_UNITS:
        return Interval(estimate, None, None, n, "bootstrap")
    rng = np.random.default_rng(seed)
    values = []
    per_block = max(1, (1 << 22) // L)   # resamples at a time: two (block, L) float64 means, 32 MiB each
    for start in range(0, BOOTSTRAP_RESAMPLES, per_block):
        b = min(per_block, BOOTSTRAP_RESAMPLES - start)
        picks = rng.integers(0, n, (b, n))                                           # (b, n)
        weights = torch.zeros(b, n, dtype=torch.float64)
        weights.scatter_add_(1, torch.from_numpy(picks), torch.full((b, n), 1 / n, dtype=torch.float64))
        values.append(js_divergence(weights @ x, weights @ y).numpy())            # (b,)
    values = np.concatenate(values)
    lean = values.mean() - estimate
    low, high = np.percentile(values, [2.5, 97.5]) - lean
    return Interval(estimate, max(float(low), 0.0), float(high), n, "bootstrap")


def length_rows(length: int, entries: list[Variant], reference: Variant, reductions: dict[str, Reduction],
                documents: int) -> list[dict]:
    """The result rows of one length, one per variant (the reference's own among them): what it is, how many
    samples, documents and distributions stand behind it, and its ``summarize`` numbers."""
    rows = []
    for v in entries:
        n = reductions[v.label].samples
        rows.append({"length": length, "rope": v.label, "rope_type": v.config.rope.type,
                     "reference": reference.label, "samples": n, "documents": documents,
                     "distributions": n * v.config.num_hidden_layers * v.config.num_attention_heads,
                     **summarize(reductions[v.label], reductions[reference.label])})
    return rows


def corpus_names(data: list[str] | None, builtin: str, count: int) -> tuple[str, list[str | None]]:
    """The corpus's name for result files and each of its ``count`` documents' names where it has one: the
    built-in books, and ``data`` text files (one document each)."""
    if data:
        files = [Path(item).expanduser() for item in data]
        whole = len(files) == count and all(f.is_file() and f.suffix in TEXT_SUFFIXES for f in files)
        return "data: " + " ".join(data), [f.name for f in files] if whole else [None] * count
    if builtin == "books":
        return "builtin:books", document_names()
    return f"builtin:{builtin}", [None] * count


CLAIM = ("Within the pretrained length, NTK and YaRN barely change the attention distribution, PI does (seed "
         "paper, Table 1: JS of the mean last-query attention against plain RoPE)")


def summary(rows: list[dict], pretrained_length: int, reference_is_rope: bool) -> tuple[str, str, list[str], dict]:
    """(title, claim, finding lines, numbers) for ``io.write_summary``: per length, the JS of means of every
    variant against the reference with its interval and n, and each variant's last-query entropy with its
    standard error. Where the reference is plain RoPE and the length within the pretrained one, the claim's
    pairs go to ``numbers["comparisons"]`` (PI's JS above NTK's, PI's above YaRN's) for paper.py's verdict;
    elsewhere the line says why the claim does not apply."""
    finding, numbers, comparisons = [], [], []
    for L in dict.fromkeys(r["length"] for r in rows):
        mine = [r for r in rows if r["length"] == L and r["rope"] != r["reference"]]
        cells = {r["rope"]: Interval(r["js_mean_nats"], r["js_mean_nats_low"], r["js_mean_nats_high"],
                                     r["js_mean_nats_n"], "bootstrap") for r in mine}
        numbers += [{"length": L, "rope": label, **i.fields("js_mean_nats")} for label, i in cells.items()]
        line = (f"L={L}: JS of means vs {mine[0]['reference'] if mine else 'the reference'}, nats: "
                + ", ".join(f"{label} {i.text('.4f')}" for label, i in cells.items()))
        kind = {r["rope"]: r["rope_type"] for r in mine}
        if not reference_is_rope:
            line += "; the claim is about plain RoPE as the reference: no verdict"
        elif L > pretrained_length:
            line += f"; past the pretrained length {pretrained_length}: the claim does not cover it"
        else:
            comparisons += [{"claim": f"At L={L}, PI's JS of means from plain RoPE is above {other}'s",
                             "expected": "higher", "a": {"label": label, **dataclasses.asdict(cells[label])},
                             "b": {"label": other, **dataclasses.asdict(cells[other])}}
                            for label in cells if kind[label] == "pi"
                            for other in cells if kind[other] in ("ntk", "yarn")]
        finding.append(line + ".")
        entropies = [r for r in rows if r["length"] == L]
        finding.append(f"L={L}: entropy of the last query's attention, nats (ln L = {math.log(L):.2f} is uniform): "
                       + ", ".join(f"{r['rope']} {r['entropy']:.2f} ("
                                   + ("" if r["entropy_se"] is None else f"SE {r['entropy_se']:.2f}, ")
                                   + f"n={r['entropy_n']})" for r in entropies) + ".")
    return ("Attention: JS of mean distributions against the reference (seed paper Table 1)", CLAIM, finding,
            {"pretrained_length": pretrained_length, "js_mean_nats": numbers, "comparisons": comparisons})


# ----------------------------------------------------------------------------------------------------------------
# Samples, and the state that lets a killed run resume
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sample:
    """One sequence every variant reads: window ``offset`` .. ``offset + L`` of document ``document``."""
    document: int          # index into the documents
    offset: int            # first token, counted in the first tokenizer's (the model's) ids of the document
    ids: list              # per tokenizer: the L token ids (np.int64) its models read

    def record(self, names: list[str | None]) -> dict:
        """Where it comes from, for the results file; ``names``: each document's name or None."""
        return {"document": self.document, "name": names[self.document], "token_offset": self.offset}


def pick_samples(docs: list, tokenizers: list, vocab_sizes: list[int], lengths: list[int],
                 count: int) -> dict[int, list[Sample]]:
    """length -> ``count`` samples by the one sample rule (ropelite.data.sample_windows): the first L tokens of
    distinct documents first, then further non-overlapping windows of the longest documents.

    Windows are cut from the first tokenizer's ids. Another tokenizer (a reference model's) reads the same text:
    at offset 0 its own first L tokens of the document, further on the first L tokens (no BOS) of the text that
    decodes from the window's first token to the document's end; a window where that text has fewer than L tokens
    is passed over for the next one. With one tokenizer, documents are tokenised only until ``count`` of them
    have max(lengths) tokens (the rule then picks nothing beyond them)."""
    first, long_enough = [], 0
    for doc in docs:
        first.append(tokenize_checked([doc], tokenizers[0], vocab_sizes[0])[0])
        long_enough += len(first[-1]) >= max(lengths)
        if long_enough >= count and len(tokenizers) == 1:
            break
    picks = {}
    for L in lengths:
        sizes = [len(ids) for ids in first]
        windows = sum(size // L for size in sizes)
        candidates = sample_windows(sizes, windows, L) if windows else []
        chosen = []
        for d, offset in candidates:
            ids = [first[d][offset:offset + L]] + [
                window_ids(docs[d], first[d], offset, L, tokenizers[0], tok, vocab)
                for tok, vocab in zip(tokenizers[1:], vocab_sizes[1:])]
            if all(len(x) == L for x in ids):
                chosen.append(Sample(d, offset, ids))
                if len(chosen) == count:
                    break
        if len(chosen) < count:
            under = " under every tokenizer" if len(tokenizers) > 1 else ""
            raise RopeliteError(
                f"only {len(chosen)} non-overlapping windows of {L} tokens{under} in {len(first)} "
                f"document{'s' * (len(first) != 1)}, "
                f"--samples asks for {count}: use --samples {len(chosen)} or fewer, shorter --lengths, or --data "
                f"with longer or more documents")
        picks[L] = chosen
    return picks


def window_ids(doc, first_ids: np.ndarray, offset: int, length: int, first_tokenizer, tokenizer,
               vocab_size: int) -> np.ndarray:
    """At most ``length`` ids of ``tokenizer`` for the text where the first tokenizer's window at ``offset``
    starts (token arrays are shared by every model: the same slice)."""
    if isinstance(doc, np.ndarray):
        text, add_bos = doc[offset:], None
    elif offset == 0:
        text, add_bos = doc, None
    else:   # the window's text to the document's end: its first L tokens do not depend on where a cut would fall
        text, add_bos = first_tokenizer.decode(first_ids[offset:]), False
    return tokenize_checked([text], tokenizer, vocab_size, add_bos=add_bos)[0][:length]


STATE_FORMAT = 3  # 3: the state holds each sample's mean distribution, entropies and JS, for the intervals


def state_meta(settings: dict, labels: list[str], samples: list[list[np.ndarray]]) -> dict:
    """What a state file must match to be resumed: the settings, the variants, and a hash per sample (so a saved
    state is used only for a prefix of the same samples). As it reads back from the file (tuples become lists)."""
    hashes = [hashlib.sha256(b"".join(x.tobytes() for x in s)).hexdigest()[:16] for s in samples]
    return json.loads(json.dumps({"format": STATE_FORMAT, "settings": settings, "labels": labels,
                                  "sample_hashes": hashes}))


def save_state(path: Path, meta: dict, reductions: dict[str, Reduction]) -> None:
    arrays = {"meta": np.array(json.dumps(meta))}
    for i, r in enumerate(reductions.values()):
        arrays.update(r.arrays(f"{i}/"))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)


def load_state(path: Path, meta: dict) -> dict[str, Reduction] | None:
    """The saved sums when they were made with the same settings and a prefix of the same samples."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            saved = json.loads(str(arrays["meta"]))
            done = saved.get("sample_hashes", [])
            if (saved.get("format") != meta.get("format") or saved.get("settings") != meta["settings"]
                    or saved.get("labels") != meta["labels"]
                    or done != meta["sample_hashes"][:len(done)]):
                return None
            return {label: Reduction.from_arrays(arrays, f"{i}/") for i, label in enumerate(saved["labels"])}
    except (OSError, ValueError, KeyError):
        raise RopeliteError(f"{path} is not an analyze.py attention state file; use another --out") from None


def measure(entries: list[Variant], reference: Variant, samples: list[Sample], state_path: Path, meta: dict,
            bar) -> dict[str, Reduction]:
    """The running sums of every entry over the samples of one length, resumed from ``state_path`` when it holds
    a prefix of this run; rewritten there after every sample. ``bar`` counts tokens read."""
    L, count = len(samples[0].ids[0]), len(samples)
    red = load_state(state_path, meta)
    if red is None:
        red = {v.label: Reduction(v.config.num_hidden_layers, v.config.num_attention_heads, L) for v in entries}
    done = red[reference.label].samples
    if done:
        print(f"attention: L={L}: {done} of {count} samples already in {state_path}", file=sys.stderr)
    bar.update(L * done * len(entries))
    for s in range(done, count):
        ref_rows = last_rows(reference, samples[s].ids[reference.tokens])   # first: every variant is paired with it
        bar.update(L)
        for v in entries:
            if v is not reference:
                red[v.label].add(last_rows(v, samples[s].ids[v.tokens]), ref_rows)
                bar.update(L)
        red[reference.label].add(ref_rows, None)
        save_state(state_path, {**meta, "sample_hashes": meta["sample_hashes"][:s + 1]}, red)
        bar.set_postfix_str(f"L={L} sample {s + 1}/{count}")
    return red


# ----------------------------------------------------------------------------------------------------------------
# Algorithm 1: the entropy of the attention that produces each generated token
# ----------------------------------------------------------------------------------------------------------------

class EntropyMeter:
    """on_attention callback: sums, per layer, the head-mean entropy of each observed attention row."""

    def __init__(self, n_layers: int):
        self.sums = [0.0] * n_layers
        self.rows = [0] * n_layers

    def __call__(self, layer: int, positions: torch.Tensor, probs: torch.Tensor) -> None:
        h = entropy(probs)                                   # (B, H, t): one value per head and query row
        self.sums[layer] += float(h.mean(dim=(0, 1)).sum())
        self.rows[layer] += h.shape[-1]

    def per_layer(self) -> list[float]:
        """Mean over heads and generated tokens, per layer."""
        return [s / n if n else float("nan") for s, n in zip(self.sums, self.rows)]


def answer_with_entropy(model: Llama, ids: list[int], max_new_tokens: int,
                        eos_id=None) -> tuple[list[int], list[float]]:
    """Greedy answer and per-layer mean attention entropy of the rows that produced its tokens."""
    meter = EntropyMeter(model.config.num_hidden_layers)
    device = next(model.parameters()).device
    out = generate(model, torch.tensor([ids], device=device), max_new_tokens, eos_id, on_attention=meter)
    return out, meter.per_layer()
