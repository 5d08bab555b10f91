"""Attention distributions and JS divergence between RoPE variants, frequency maps, and the base bound.

    python analyze.py attention --rope rope pi ntk yarn --factor 4 --lengths 2048 --samples 3
    python analyze.py attention --rope rope pi ntk yarn --factor 4 --base 1000000 --lengths 2048 8192 --samples 10
    python analyze.py attention --reference-model path/to/long-context-model --lengths 8192
    python analyze.py attention --data book.txt --samples 10 --lengths 2048   # 10 windows of one long book
    python analyze.py attention --model path/to/model --rope rope --lengths 128 256 512 1024 2048  # entropy vs L
    python analyze.py bound --dim 128                        # Men et al.'s table, 1K..128K (about 10 s)
    python analyze.py bound --dim 128 --lengths 1024:1048576  # all of it, to 1M (about 2 minutes on 2 cores)
    python analyze.py freqs --rope rope pi ntk yarn dynamic llama3 --factor 4
    python analyze.py freqs --dim 128 --theta 10000 --original 4096 --factor 16

attention   the seed paper's Figure 2 and Table 1 (Zhong et al. 2024, section 3)
bound       Men et al. 2024, "Base of RoPE bounds context length": the lower bound of the base per context length
freqs       per-pair wavelength and scaling of each RoPE variant (how each treats fast and slow dimensions)

Each subcommand writes <name>.json (settings, definitions, results), <name>.csv (the table) and PNG figures into
--out (default runs/analyze); `analyze.py SUBCOMMAND --help` says exactly what is computed. Bad input ends as one
line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ropelite import attention, bound
from ropelite.attention import DEFINITIONS, Variant, measure, pick_samples, state_meta
from ropelite.cli import (GRID_HELP, ArgumentParser, add_data_args, add_model_args, check, load_for, needs_factor,
                          parse_grid, run_script, token_bar, variant_config)
from ropelite.data import load_documents
from ropelite.errors import RopeliteError
from ropelite.hf import read_config
from ropelite.io import lock_out, pyplot, save_figure, write_csv, write_json, write_summary
from ropelite.model import LlamaConfig
from ropelite.rope import RopeConfig, check_scale_factor, pair_table

# ----------------------------------------------------------------------------------------------------------------
# attention: seed paper Figure 2 and Table 1
# ----------------------------------------------------------------------------------------------------------------

ATTENTION_DOC = """\
The seed paper's Figure 2 and Table 1 (Zhong et al. 2024, section 3), training-free: the variants in --rope share
one loaded model (the RoPE is an argument of each forward, which computes the frequencies from it; no config is
changed).

Samples (the one sample rule, ropelite.data.sample_windows): for each length L, --samples sequences of L tokens,
first the first L tokens of distinct documents, then further non-overlapping windows (tokens [kL, (k+1)L)) of
the documents long enough, so one long book gives several samples. Documents come from --data or, without it,
the built-in --builtin text (books: four whole public-domain books; the other kinds are joined into documents of
at least 4.5 * max(--lengths) characters). Windows after a document's first carry no BOS token. With
--reference-model and another tokenizer, windows are cut in --model's tokens and the reference reads the same
text (at a window's first character its own next L tokens; a window where it has fewer is passed over). Every
variant and the reference see the same samples; attention.json's "windows" lists each one's (document index,
name, token offset in --model's tokens) per length.

What is measured. For sample s, layer l and head h, p_{s,l,h} is the attention distribution of the LAST query
(position L-1) over the keys 0..L-1 (softmax probabilities, float32). The forward runs on the fast path and only
that row is formed eagerly; per sample only (layers, heads, L) numbers are held and everything else is running
sums, so memory is O(L * heads * layers), never O(L^2).
  mean distribution     pbar = mean over (s, l, h) of p_{s,l,h}: the red line of Figure 2 (one curve over L keys)
  per-head curves       mean over s of p_{s,l,h}, one per (layer, head): Figure 2's thin lines
  js_mean               JS(pbar_variant, pbar_reference): Table 1. JS(p, q) = KL(p||m)/2 + KL(q||m)/2 with
                        m = (p + q)/2, in nats (natural log; at most ln 2 = 0.693) and bits (at most 1)
  js_per_distribution   mean over (s, l, h) of JS(p_{s,l,h} variant, p_{s,l,h} reference), pairing the same
                        sample, layer and head: a DIFFERENT quantity, never smaller than js_mean (JS is jointly
                        convex); null when the reference model has another number of layers or heads
  entropy_per_layer     mean over (s, h) of H(p_{s,l,h}) = -sum p ln p, nats, per layer; entropy = their mean;
                        entropy_of_mean = H(pbar); uniform attention over L keys would give ln L
Intervals, over the samples (the units that read separate text): js_mean_nats_low/high, a seeded percentile
bootstrap, paired (the same resampled samples for the variant and the reference); js_per_distribution_nats_low/
high, a bootstrap of the per-sample means; entropy_se and entropy_per_layer_se, the standard error over samples.
Below 3 samples they are null and the table gives n alone.
The reference is plain RoPE on the same model and length, or --reference-model (its own checkpoint RoPE, its own
tokenizer on the same documents). The paper's Table 1 values exceed ln 2, so its unit is not a single JS in nats.

Outputs in --out: attention.json (settings, these definitions, the windows, one row per (length, variant)),
attention.csv (the rows), attention_L<L>.png (Figure 2: one panel per variant, log y, x = key position, thin lines
coloured by layer), attention_entropy.png (entropy per layer, and with several lengths entropy against L: the
last-query entropy vs length of one model is `--rope rope --lengths 128 256 512 1024 2048`),
attention_summary.json (the headline beside the paper's claim, for paper.py) and attention_L<L>.npz (per_head_sum
(layers, heads, L) = sum over samples; per sample: the mean distribution, the entropy and JS per layer; samples
done). The npz is rewritten after every sample, so a killed run resumes there. The printed table gives the JS of
means and the entropy with their intervals.
"""

def distribution_figure(panels: list[tuple[str, np.ndarray]], length: int, max_curves: int, title: str):
    """Figure 2: per panel, the per-head curves (thin, coloured by layer, the colorbar's key; an evenly spaced
    subset of at most ``max_curves``) and their mean over samples, layers and heads (red), log y, x = key
    position. ``panels``: (label, per-head curves (layers, heads, L))."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 3.8), sharey=True, squeeze=False,
                             layout="constrained")
    layers = max(per_head.shape[0] for _, per_head in panels)
    colour = ScalarMappable(Normalize(0, max(layers - 1, 1)), plt.cm.viridis)
    x = np.arange(length)
    lows = []
    for ax, (name, per_head) in zip(axes[0], panels):
        heads = per_head.shape[1]
        flat = per_head.reshape(-1, length)                                         # (layers*heads, L)
        pick = np.unique(np.linspace(0, len(flat) - 1, min(max_curves, len(flat))).round().astype(int))
        shown = np.where(flat[pick] > 0, flat[pick], np.nan)  # log axis: exact zeros are left out
        segments = np.stack([np.broadcast_to(x, shown.shape), shown], axis=-1)     # (curves, L, 2)
        ax.add_collection(LineCollection(segments, colors=colour.to_rgba(pick // heads), linewidths=0.3,
                                         alpha=0.35))
        mean = flat.mean(0)
        ax.plot(x, np.where(mean > 0, mean, np.nan), color="red", linewidth=1.2,
                label="mean over samples, layers, heads")
        ax.set_yscale("log")
        ax.set_xlim(0, length - 1)
        ax.set_xlabel("key position")
        ax.set_title(f"{name} (L={length}, {len(pick)} of {len(flat)} heads drawn)", fontsize=9)
        positive = flat[flat > 0]
        if positive.size:
            lows.append(np.percentile(positive, 1))
            ax.set_ylim(top=1.2 * positive.max())
    if lows:
        axes[0][0].set_ylim(bottom=min(lows))
    axes[0][0].set_ylabel("attention probability of the last query")
    axes[0][0].legend(fontsize=7, loc="upper center")
    bar = fig.colorbar(colour, ax=axes[0].tolist(), pad=0.01, fraction=0.04)
    bar.set_label("layer of a thin line (one (layer, head), mean over samples)", fontsize=8)
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    fig.suptitle(title, fontsize=10)
    return fig


LINE_STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]


def entropy_figure(rows: list[dict]):
    """Left: the mean entropy per layer, one colour per variant and one line style per length, each ln L (the
    entropy of uniform attention over L keys) a grey line in its length's style, labelled. Right, with several
    lengths: the mean over layers against L, one line per variant, ln L as the labelled dashed grey curve.
    One key below both panels."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    labels = list(dict.fromkeys(r["rope"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    colours = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    styles = {L: LINE_STYLES[i % len(LINE_STYLES)] for i, L in enumerate(lengths)}
    several = len(lengths) > 1
    fig, axes = plt.subplots(1, 1 + several, figsize=(6.5 + 5 * several, 4.2), squeeze=False, layout="constrained")
    ax = axes[0][0]
    for r in rows:
        ax.plot(r["entropy_per_layer"], color=colours[r["rope"]], linestyle=styles[r["length"]], marker=".",
                markersize=3, linewidth=1)
    for L in lengths:
        ax.axhline(math.log(L), color="grey", linestyle=styles[L], linewidth=0.8)
        ax.annotate(f"ln {L} = {math.log(L):.2f} (uniform)", (1, math.log(L)), xycoords=("axes fraction", "data"),
                    xytext=(-2, 2), textcoords="offset points", ha="right", va="bottom", fontsize=7, color="grey")
    ax.set_xlabel("layer")
    ax.set_ylabel("entropy of the last query's attention (nats)")
    ax.set_title("mean over samples and heads, per layer", fontsize=9)
    keys = ([Line2D([], [], color=colours[lab], label=lab) for lab in labels]
            + [Line2D([], [], color="black", linestyle=styles[L], label=f"L = {L}") for L in lengths] * several
            + [Line2D([], [], color="grey", linestyle="--" if several else "-", linewidth=0.8,
                      label="ln L: uniform attention")])
    fig.legend(handles=keys, loc="outside lower center", ncol=min(len(keys), 8), fontsize=7)
    if several:
        ax = axes[0][1]
        for lab in labels:
            mine = sorted((r["length"], r["entropy"]) for r in rows if r["rope"] == lab)
            ax.plot(*zip(*mine), color=colours[lab], marker="o", markersize=4, label=lab)
        ax.plot(lengths, [math.log(L) for L in lengths], color="grey", linestyle="--", linewidth=0.8,
                label="ln L: uniform attention")
        ax.annotate("ln L (uniform)", (lengths[-1], math.log(lengths[-1])), xytext=(-2, 4),
                    textcoords="offset points", ha="right", va="bottom", fontsize=7, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.minorticks_off()
        ax.margins(y=0.08)  # room for the ln L label above the curve
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel("entropy, mean over layers (nats)")
        ax.set_title("mean over layers, against length", fontsize=9)
    fig.suptitle("entropy of the last query's attention", fontsize=10)
    return fig


ANALYZE_FACTOR = 4.0
FACTOR_HELP = ("scale factor s (>= 1) of the variants that scale (default: the checkpoint's own factor for the "
               "variant it runs; for any other, the checkpoint's factor when it scales, so all are compared at one "
               "s, else 4: at s = 1 every extension is plain RoPE and there is nothing to compare; the one rule of "
               "every script, ropelite.cli.FACTOR_RULE, with analyze.py's default; a line says when it is used)")


def say_default_factor(checkpoint: RopeConfig, ropes, base: float | None, factor: float) -> None:
    """One line naming the variants that take analyze.py's default factor, when any does."""
    named = [r for r in dict.fromkeys(ropes) if needs_factor(checkpoint, r, base)]
    if named:
        print(f"rope: --factor not given, so {', '.join(named)} run at s = {factor:g} (analyze.py's default)",
              file=sys.stderr)


def analyze_factor(checkpoint: RopeConfig) -> float:
    """analyze.py's default scale factor (``cli.FACTOR_RULE``) for a variant the checkpoint does not run: the
    checkpoint's own factor when it scales, so every variant is compared at one s, else 4 (at s = 1 every
    extension is plain RoPE and there is nothing to compare)."""
    return checkpoint.factor if checkpoint.factor > 1 else ANALYZE_FACTOR


def load_variants(args) -> tuple[list[Variant], Variant, list, list[int]]:
    """(variants, reference, tokenizers, vocabulary sizes). The variants share one loaded model."""
    model, tokenizer = load_for(args)
    base = model.config
    variants = []
    if args.factor is None:
        say_default_factor(base.rope, args.rope, args.base, analyze_factor(base.rope))
    for rope in dict.fromkeys(args.rope):
        config = variant_config(base, rope, args.factor, args.base, args.rope, default=analyze_factor(base.rope))
        variants.append(Variant(config.rope.describe(), model, config, 0))
    tokenizers, vocab = [tokenizer], [base.vocab_size]
    if args.reference_model is None:
        config = base.with_rope(rope="rope", factor=args.factor)
        found = [v for v in variants if v.config == config]
        reference = found[0] if found else Variant("rope (reference)", model, config, 0)
    else:
        ref_model, ref_tok = load_for(args, args.reference_model)
        name = Path(args.reference_model).name or args.reference_model
        reference = Variant(f"{name} {ref_model.config.rope.describe()} (reference)", ref_model, ref_model.config, 1)
        tokenizers.append(ref_tok)
        vocab.append(ref_model.config.vocab_size)
    return variants, reference, tokenizers, vocab


def attention_main(args) -> None:
    lengths = parse_grid(args.lengths, "--lengths")
    check(lengths[0] >= 2, "--lengths must be at least 2 tokens")
    check(args.samples >= 1, "--samples must be at least 1")
    check(args.max_curves >= 0, "--max-curves must be >= 0")
    docs = load_documents(args.data, args.builtin, min_chars=math.ceil(4.5 * max(lengths)))
    corpus, names = attention.corpus_names(args.data, args.builtin, len(docs))
    variants, reference, tokenizers, vocab = load_variants(args)
    entries = variants + ([] if reference in variants else [reference])
    picks = pick_samples(docs, tokenizers, vocab, lengths, args.samples)
    windows = {str(L): [s.record(names) for s in picks[L]] for L in lengths}
    out = Path(args.out)
    settings = {"model": args.model, "reference_model": args.reference_model, "dtype": args.dtype,
                "data": corpus, "samples": args.samples, "lengths": lengths,
                "ropes": {v.label: dataclasses.asdict(v.config.rope) for v in entries}, "reference": reference.label}
    c = variants[0].config
    title = (f"{Path(args.model).name}: the last query's attention, {args.samples} samples x "
             f"{c.num_hidden_layers} layers x {c.num_attention_heads} heads")

    rows: list[dict] = []
    with token_bar(sum(lengths) * args.samples * len(entries), "attention") as bar:
        for L in lengths:
            per_length = {k: v for k, v in settings.items() if k not in ("samples", "lengths")} | {"length": L}
            meta = state_meta(per_length, [v.label for v in entries], [s.ids for s in picks[L]])
            red = measure(entries, reference, picks[L], out / f"attention_L{L}.npz", meta, bar)
            used = list(dict.fromkeys(names[s.document] or s.document for s in picks[L]))  # in sample order
            named = ", ".join(map(str, used)) if len(used) <= 6 else f"{len(used)} documents"
            rows += attention.length_rows(L, entries, reference, red, len(used))
            write_csv(out / "attention.csv", rows)
            write_json(out / "attention.json", {"settings": settings, "definitions": DEFINITIONS,
                                                "windows": windows, "rows": rows})
            save_figure(distribution_figure([(v.label, red[v.label].per_head().numpy()) for v in entries], L,
                                            args.max_curves, f"{title}; {corpus}, {named}"),
                        out / f"attention_L{L}.png", dpi=110)
            save_figure(entropy_figure(rows), out / "attention_entropy.png", dpi=110)
            write_summary(out, "attention", *attention.summary(rows, c.rope.original_max_position_embeddings,
                                                               args.reference_model is None))
    print(table1(rows))
    print(f"wrote {out}/attention.json, attention.csv, attention_L*.png, attention_entropy.png")


def table1(rows: list[dict]) -> str:
    """Table 1 as text: per length and variant, JS(pbar_variant, pbar_reference) in nats with its 95 % bootstrap
    interval over samples, then the last query's entropy with its standard error over samples; n in the header
    (no interval, no standard error below 3 samples)."""
    labels = list(dict.fromkeys(r["rope"] for r in rows))
    compared = [lab for lab in labels if any(r["rope"] == lab != r["reference"] for r in rows)]  # JS to itself: 0
    cell = {(r["length"], r["rope"]): r for r in rows}
    js = {key: f"{r['js_mean_nats']:.4f}" + ("" if r["js_mean_nats_low"] is None else
                                             f" [{r['js_mean_nats_low']:.4f}, {r['js_mean_nats_high']:.4f}]")
          for key, r in cell.items()}
    h = {key: f"{r['entropy']:.3f}" + ("" if r["entropy_se"] is None else f" ± {r['entropy_se']:.3f}")
         for key, r in cell.items()}
    width = max([17, *(len(lab) + 2 for lab in labels), *(len(t) + 2 for t in [*js.values(), *h.values()])])
    lines = []
    reference = rows[0]["reference"] if rows else ""
    for name, text, shown in ((f"JS of mean distributions vs {reference}, nats [95 % bootstrap interval over "
                               "samples]", js, compared),
                              ("entropy of the last query's attention, nats, mean ± standard error over samples", h,
                               labels)):
        lines += [name, "length  samples" + "".join(f"{lab:>{width}}" for lab in shown)]
        for L in dict.fromkeys(r["length"] for r in rows):
            n = next(r["samples"] for r in rows if r["length"] == L)
            lines.append(f"{L:>6} {n:>8}" + "".join(f"{text.get((L, lab), '-'):>{width}}" for lab in shown))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# bound: Men et al. 2024
# ----------------------------------------------------------------------------------------------------------------

BOUND_DOC = """\
Men et al. 2024 (Theorem 1): B_m = sum_{i<d/2} cos(m theta_i), theta_i = b^(-2i/d), is the long-term decay of the
ability to attend more to similar tokens than to random ones. The context a base reaches is
L_b = sup{L : B_m >= 0 for every m in [0, L]}; the lower bound of the base for a context L is the smallest b whose
B_m >= 0 for every m <= L. The feasible set is not monotone in b (narrow feasible islands lie below the bulk), so
bound.min_base_scan walks up from b = 1 with steps certified by a bound on B's slope and curvature in ln b
(|B_m(u + s) - B_m(u) - s B_m'(u)| <= s^2 sum_i x_i^2 (phi_i^2 + phi_i) / 2, u = ln b, x_i = 2i/d, phi_i = m theta_i):
at each base one m with B_m < 0 proves every base up to the next one infeasible. Where that step would be below
--resolution (relative), the scan steps by --resolution and a witness at the next base must reach back over the
step; a step it cannot close is an open gap, the only place an island could hide. The answer is checked by direct
float64 sums over every m <= L. The bulk is the smallest base above which every base up to --bulk-up-to times
the smallest one is feasible, by a certified walk down from there.

bound.json/csv: one row per length: our min_base, infeasible_below (every base from 1 up to it is proven to fail,
so the infimum lies between the two), open_gaps, bulk_base; the paper's printed base (d=128 only), whether it
satisfies its own criterion (B_m >= 0 for all m <= L) and the context it reaches; the context our base reaches.
Contexts are searched up to 2L. Then, per model (--model, --theta with --dim; default:
SmolLM2-135M and LLaMa-2-7B), the context its base reaches (searched up to 2^22) next to its training length.
bound.png: B_m for --plot-bases (log x, m up to max(2^20, the longest length)), the first negative m of each
marked. Rows are written after each length; a rerun with the same --dim, --resolution and --bulk-up-to skips the
lengths already in bound.json.
"""

def model_context_rows(args) -> list[dict]:
    """bound.model_rows of --model (their config.json) and of --theta at --dim, or of the preset models."""
    from ropelite.hub import resolve_model

    found = []
    for name in args.model or []:
        c = read_config(resolve_model(name))
        found.append((name, c.head_dim, c.rope.theta, c.rope.original_max_position_embeddings))
    found += [(f"theta={t:g}", args.dim, t, None) for t in args.theta or []]
    return bound.model_rows(found or bound.known_models())


def draw_B(dim: int, bases: list[float], max_m: int, path: Path) -> None:
    plt = pyplot()
    # every integer m up to 20000 (B oscillates fast there), then log-spaced: a log-x plot of a long range
    m = np.unique(np.concatenate([np.arange(1, min(max_m, 20000) + 1),
                                  np.geomspace(1, max_m, 20000).round()])).astype(np.int64)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for base in bases:
        line, = ax.plot(m, bound.men_B(m, dim, base), linewidth=0.6, label=f"b = {base:g}")
        first = bound.first_negative_B(dim, base, max_m)
        if first is not None:
            ax.axvline(first, color=line.get_color(), linestyle=":", linewidth=1)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("relative distance m")
    ax.set_ylabel(r"$B_m = \sum_i \cos(m\theta_i)$")
    ax.set_title(f"Men et al.: B_m at d={dim} (dotted: first m with B_m < 0)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def bound_main(args) -> None:
    lengths = parse_grid(args.lengths, "--lengths")
    check(args.dim >= 2 and args.dim % 2 == 0, f"--dim must be an even number >= 2, got {args.dim}")
    check(lengths[0] >= 1, "--lengths must be positive")
    check(0 < args.resolution < 0.1, "--resolution must be in (0, 0.1)")
    check(args.bulk_up_to > 1, "--bulk-up-to must be > 1")
    check(all(b > 1 for b in [*args.plot_bases, *(args.theta or [])]), "bases must be > 1")
    out = Path(args.out)
    path = out / "bound.json"
    try:
        old = json.loads(path.read_text())["rows"] if path.exists() else []
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RopeliteError(f"{path} is not an analyze.py bound file; use another --out") from None
    same = {r["length"]: r for r in old if (r.get("dim"), r.get("resolution"), r.get("bulk_up_to"))
            == (args.dim, args.resolution, args.bulk_up_to) and "infeasible_below" in r}  # the certified scan's
    models = model_context_rows(args)
    rows = []
    for L in tqdm(lengths, desc="bound", unit="length", dynamic_ncols=True):
        rows.append(same.get(L) or bound.bound_row(args.dim, L, args.resolution, args.bulk_up_to))
        write_json(path, {"definitions": bound.DEFINITIONS, "rows": rows, "models": models})
        write_csv(out / "bound.csv", rows)
        write_summary(out, "bound", *bound.summary(rows))
    write_csv(out / "bound_models.csv", models)
    draw_B(args.dim, args.plot_bases, max(max(lengths), 1 << 20), out / "bound.png")
    print(f"resolution {args.resolution:g} (relative, in b); bulk walked down from {args.bulk_up_to:g} x min base")
    print("min base: the smallest base that reaches the length; every base up to 'proven below' fails")
    print(f"bulk: the smallest base above which every base up to {args.bulk_up_to:g} x min base reaches the length "
          f"('-': some base that fails remains that far up)")
    print(f"{'length':>8} {'min base':>12} {'proven below':>13} {'gaps':>4} {'bulk':>10} {'paper':>8} {'paper ok':>8} "
          f"{'paper reaches':>13}")
    for r in rows:
        paper = "-" if r["paper_base"] is None else f"{r['paper_base']:.2g}"
        ok = "-" if r["paper_base_reaches"] is None else "yes" if r["paper_base_reaches"] else "NO"
        reach = "-" if r["paper_base_context"] is None else str(r["paper_base_context"])
        bulk = "-" if r["bulk_base"] is None else f"{r['bulk_base']:.4g}"
        print(f"{r['length']:>8} {r['min_base']:>12.7g} {r['infeasible_below']:>13.7g} {r['open_gaps']:>4} {bulk:>10} "
              f"{paper:>8} {ok:>8} {reach:>13}")
    for m in models:
        print(f"{m['model']}: d={m['dim']} base {m['base']:g} reaches {m['context_reached']} tokens"
              + ("" if m["trained_length"] is None else f" (trained at {m['trained_length']})"))
    print(f"wrote {out}/bound.json, bound.csv, bound_models.csv, bound.png")


# ----------------------------------------------------------------------------------------------------------------
# freqs: what each variant does to each pair
# ----------------------------------------------------------------------------------------------------------------

FREQS_DOC = """\
For each pair i = 0..d/2-1 and each variant: theta_i = b^(-2i/d) of plain RoPE at the pretrained base b, the
variant's theta'_i at --length (only dynamic and longrope depend on it), the wavelength 2 pi / theta'_i in tokens,
the scale theta_i / theta'_i (1 = the pair is kept as RoPE; s = interpolated like PI), and L / wavelength, the
rotations the pair makes in the original context L. Pair 0 is the fastest (wavelength 2 pi).

The shape comes from --model's config.json (no weights are read) or, with --dim and --theta, from the flags
alone; --dim/--theta/--original override the config. freqs.json (settings, per-variant attention factor, rows),
freqs.csv (one row per (variant, pair)) and freqs.png (scale vs pair, log y; wavelength vs pair with the original
context L and --length marked).
"""


def freqs_main(args) -> None:
    if args.dim is not None and args.theta is not None:
        source = "flags"
        rope = RopeConfig(theta=args.theta, original_max_position_embeddings=args.original or 4096)
        config = LlamaConfig(vocab_size=1, hidden_size=args.dim, intermediate_size=1, num_hidden_layers=0,
                             num_attention_heads=1, num_key_value_heads=1, head_dim=args.dim, rope=rope)
    else:
        from ropelite.hub import resolve_model
        source = args.model
        config = read_config(resolve_model(args.model))
        rope = config.rope.replace(**{k: v for k, v in (("theta", args.theta),
                                                        ("original_max_position_embeddings", args.original))
                                      if v is not None})
        config = dataclasses.replace(config, head_dim=args.dim or config.head_dim, rope=rope)
    dim, theta, L = config.head_dim, config.rope.theta, config.rope.original_max_position_embeddings
    check(dim >= 2 and dim % 2 == 0, f"the rotary dim must be an even number >= 2, got {dim}")
    check(theta > 1, f"the base must be > 1, got {theta:g}")
    check(L >= 1, "--original must be positive")
    default = analyze_factor(config.rope)
    if args.factor is not None:
        check_scale_factor(args.factor)
    else:
        say_default_factor(config.rope, args.rope, args.base, default)
    length = args.length if args.length is not None else int(round(L * (args.factor or default)))
    check(length >= 1, "--length must be positive")
    rows, summary = [], []
    for name in dict.fromkeys(args.rope):
        rope = variant_config(config, name, args.factor, args.base, args.rope, default=default).rope
        label = rope.describe()
        summary.append({"rope": label, "config": dataclasses.asdict(rope),
                        "attention_factor": rope.frequencies(dim, length)[1]})
        rows += [{"rope": label, **r} for r in pair_table(rope, dim, length)]
    out = Path(args.out)
    write_json(out / "freqs.json", {"settings": {"source": source, "dim": dim, "theta": theta, "original": L,
                                                 "length": length}, "variants": summary, "rows": rows})
    write_csv(out / "freqs.csv", rows)
    draw_freqs(rows, dim, theta, L, length, out / "freqs.png")
    for s in summary:
        mine = [r for r in rows if r["rope"] == s["rope"]]
        print(f"{s['rope']:>16}: scale {mine[0]['scale']:.3g} (fastest pair) .. {mine[-1]['scale']:.3g} "
              f"(slowest), attention factor {s['attention_factor']:.4g}")
    print(f"wrote {out}/freqs.json, freqs.csv, freqs.png")


def draw_freqs(rows: list[dict], dim: int, theta: float, L: int, length: int, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r["rope"] for r in rows):
        mine = [r for r in rows if r["rope"] == label]
        pairs = [r["pair"] for r in mine]
        left.plot(pairs, [r["scale"] for r in mine], label=label)
        right.plot(pairs, [r["wavelength"] for r in mine], label=label)
    right.plot(pairs, [r["wavelength_original"] for r in mine], color="black", linestyle=":", label="original")
    right.axhline(L, color="grey", linestyle="--", linewidth=0.8)
    right.text(0, L, f" original context L={L}", va="bottom", fontsize=7)
    if length != L:
        right.axhline(length, color="grey", linestyle="-.", linewidth=0.8)
        right.text(0, length, f" --length {length}", va="bottom", fontsize=7)
    left.set_yscale("log")
    right.set_yscale("log")
    left.set_ylabel(r"scale $\theta_i / \theta'_i$")
    right.set_ylabel(r"wavelength $2\pi / \theta'_i$ (tokens)")
    for ax in (left, right):
        ax.set_xlabel("pair index i (0 = fastest)")
        ax.legend(fontsize=7)
    fig.suptitle(f"RoPE frequencies: d={dim}, base {theta:g}, L={L}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="analyze.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{attention,bound,freqs}")
    raw = argparse.RawDescriptionHelpFormatter
    hidden = {"help": argparse.SUPPRESS}
    out_help = "results folder (default runs/analyze)"

    a = sub.add_parser("attention", help="attention distributions and JS divergence (seed paper Fig. 2, Table 1)",
                       description=ATTENTION_DOC, formatter_class=raw)
    add_model_args(a, several_ropes=True, overrides={
        "--rope": {"default": ["rope", "pi", "ntk", "yarn"],
                   "help": "RoPE variants, weights loaded once (default: rope pi ntk yarn, the paper's four)"},
        "--factor": {"help": FACTOR_HELP}})
    g = a.add_argument_group("measurement")
    g.add_argument("--lengths", nargs="+", default=["2048"], metavar="N",
                   help=f"sequence lengths L, {GRID_HELP} (default 2048; the paper: 2048 8192)")
    g.add_argument("--samples", type=int, default=10, help="sequences per length, by the sample rule above (default 10, the paper's)")
    g.add_argument("--reference-model", default=None, metavar="MODEL",
                   help="compare against this model (its own RoPE and tokenizer), e.g. a long-context one; "
                        "default: plain RoPE on --model")
    g.add_argument("--max-curves", type=int, default=300,
                   help="per-head curves drawn per panel, an evenly spaced subset of the (layer, head) pairs "
                        "(default 300; the mean is over all)")
    add_data_args(a)
    a.add_argument("--out", default="runs/analyze", help=out_help)

    b = sub.add_parser("bound", help="Men et al.'s lower bound of the base per context length",
                       description=BOUND_DOC, formatter_class=raw)
    b.add_argument("--dim", type=int, default=128, help="rotary dimension d (head dim; default 128, the paper's)")
    b.add_argument("--lengths", nargs="+", default=["1024:131072"], metavar="N",
                   help=f"context lengths, {GRID_HELP} (default 1024:131072, the powers of two from 1K to 128K: "
                        "about 10 s; 1024:1048576 is the paper's whole table: about 2 minutes on 2 cores)")
    b.add_argument("--model", nargs="+", default=None, metavar="MODEL",
                   help="models whose reachable context to report (config.json only: head dim and rope_theta)")
    b.add_argument("--theta", nargs="+", type=float, default=None, metavar="BASE",
                   help="bases at --dim whose reachable context to report (default with no --model: SmolLM2-135M "
                        "d=64 b=1e5 and LLaMa-2-7B d=128 b=1e4)")
    b.add_argument("--plot-bases", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7], metavar="BASE",
                   help="bases drawn in bound.png (default 1e4 1e5 1e6 1e7)")
    b.add_argument("--resolution", type=float, default=bound.MEN_RESOLUTION,
                   help="smallest step of the certified scan, relative in b: the widest gap where an island could "
                        f"hide (default {bound.MEN_RESOLUTION:g}, bound.MEN_RESOLUTION)")
    b.add_argument("--bulk-up-to", type=float, default=1.5,
                   help="scan for the bulk threshold up to this many times the smallest base (default 1.5)")
    b.add_argument("--out", default="runs/analyze", help=out_help)

    f = sub.add_parser("freqs", help="per-pair wavelength and scaling of each RoPE variant",
                       description=FREQS_DOC, formatter_class=raw)
    add_model_args(f, several_ropes=True, overrides={
        "--model": {"help": "'smollm2' (default), a model folder or a .gguf: only its config is read"},
        "--rope": {"default": ["rope", "pi", "ntk", "yarn", "dynamic", "llama3"],
                   "help": "variants (default: rope pi ntk yarn dynamic llama3; longrope needs a checkpoint's "
                           "factor lists)"},
        "--factor": {"help": FACTOR_HELP},
        "--dtype": hidden, "--device": hidden})
    f.add_argument("--dim", type=int, default=None, help="rotary dimension d (with --theta: no model is read)")
    f.add_argument("--theta", type=float, default=None, help="pretrained base b")
    f.add_argument("--original", type=int, default=None,
                   help="pretrained context L (default: the config's; 4096 from flags)")
    f.add_argument("--length", type=int, default=None,
                   help="sequence length for length-dependent variants (dynamic, longrope); default s * L")
    f.add_argument("--out", default="runs/analyze", help=out_help)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    lock_out(args.out)  # a second run on this --out stops here, in one line
    {"attention": attention_main, "bound": bound_main, "freqs": freqs_main}[args.command](args)


if __name__ == "__main__":
    run_script(main)
