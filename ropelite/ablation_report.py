"""What a finished run folder of the miniature says (``ropelite.ablation_pipeline`` writes the folder): every
number as its mean and 95 % interval, the verdicts, the finding in words, the figures, section.md and the summary.

- Unit values (``unit_values``, ``arm_values``): every model's numbers per held-out window and per passkey trial,
  read back from eval/NAME.json and passkey/NAME/, stacked as (finetune seeds, units) per arm and stream.
- Intervals (``statistics``): per arm, stream, metric and length the pooled estimate with its 95 % interval
  (``Metric.interval``: Wilson for pass rates, a seeded bootstrap over seeds and units for means) and each seed's
  own estimate.
- Verdicts (``verdicts``): at each length >= 2L, claims 1 and 2 of the paper (``claim_1``, ``claim_2``) read off
  those intervals by rules fixed before any run.
- The finding (``finding``): per stream, RoPE and metric, the numbers and verdicts per length, every length where
  the 8L finetune goes against claim 1 (``against_claim``) and retrieval up to 2L (``retrieval_lines``).
- Figures (``draw_all``), the tables and section.md (``section``) with its sanity checks (``sanity``,
  ``count_floor``), and ``report``, which writes them all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .ablation import (BOOK_HELD_OUT, BOOTSTRAP_SEED, HOLDOUT_EVERY, METRICS, OVERLAP_LIMIT, WORD_RUN, Metric,
                       PasskeyDocuments, Split, Window, claim_1, claim_2, count_model_nll, token_stream)
from .ablation_design import EVAL_KEY_SEED, FREE, ROPE_NAMES, STREAM_LABELS, Mini, finetunes, model_folder, model_names
from .haystack import draw_heatmaps
from .hf import trained_length
from .io import (markdown_table, pivot, pyplot, read_rows, save_figure, write_csv, write_json, write_results,
                 write_summary)
from .stats import Interval, bootstrap_mean, compare
from .tokenizer import load_tokenizer

TITLE = "Longer finetuning contexts, same tokens: attention entropy, retrieval and perplexity"
PAPER_CLAIM = ("\"we finetune models on 4K and 32K training lengths with the same tokens on NTK ... models trained "
               "in more extended contexts exhibited significantly lower attention uncertainty ... The Needle test "
               "pass rates improved significantly, especially in longer testing contexts. Conversely, models trained "
               "with the same number of tokens but shorter context sizes showed little to no change in attention "
               "entropy\" (Zhong et al. 2024, §4.3)")


# ----------------------------------------------------------------------------------------------------------------
# Unit values, intervals and verdicts
# ----------------------------------------------------------------------------------------------------------------

def arms(cfg: Mini) -> list[tuple[str, str | None]]:
    """(arm, stream) in the order of every table: the pretrained model, then per RoPE the training-free model
    and its finetunes on each stream (stream None: one model, not finetuned)."""
    out: list[tuple[str, str | None]] = [("rope", None)]
    for rope in ROPE_NAMES:
        out.append((f"{rope}-free", None))
        out += [(f"{rope}-{n}", stream) for stream in cfg.stream_seeds() for n in ("L", "8L")]
    return out


def arm_label(arm: str, stream: str | None) -> str:
    if stream is None:
        return FREE[arm][1]
    rope, length = arm.split("-")
    return f"{ROPE_NAMES[rope]} x8, finetuned at {length}{STREAM_LABELS[stream]}"


def arm_models(cfg: Mini, arm: str, stream: str | None) -> list[str]:
    return [arm] if stream is None else [f"{arm}.{stream}{seed}" for seed in cfg.stream_seeds()[stream]]


def unit_values(out: Path, cfg: Mini, name: str) -> dict[tuple[str, int], np.ndarray]:
    """(metric key, length) -> the model's values per unit: per held-out window (nll, nll_last_L,
    last_query_entropy), per passkey trial in (depth, key) order (passed 0/1, answer_entropy)."""
    values = {}
    for r in json.loads((out / "eval" / f"{name}.json").read_text())["rows"]:
        for key in ("nll", "nll_last_L", "last_query_entropy"):
            values[key, r["length"]] = np.asarray(r[key])
    cells = {(c["length"], c["depth"]): c
             for c in read_rows(out / "passkey" / name, "passkey", keys=("length", "depth"))}
    for n in cfg.passkey_lengths:
        row = [cells[n, d] for d in cfg.depths]
        values["passed", n] = np.asarray([f == k for c in row for f, k in zip(c["found"], c["keys"])], dtype=float)
        values["answer_entropy", n] = np.asarray([h for c in row for h in c["entropy_trials"]])
    return values


def arm_values(out: Path, cfg: Mini) -> dict[tuple[str, str | None], dict[tuple[str, int], np.ndarray]]:
    """(arm, stream) -> (metric key, length) -> (seeds, units) array."""
    per_model = {name: unit_values(out, cfg, name) for name in model_names(cfg)}
    return {(arm, stream): {k: np.stack([per_model[m][k] for m in arm_models(cfg, arm, stream)])
                            for k in per_model[arm_models(cfg, arm, stream)[0]]}
            for arm, stream in arms(cfg)}


PPL = Metric("nll", "perplexity (truncate protocol)", "lower", math.log(1.1), exp=True)  # tables only


def metric_lengths(cfg: Mini, metric: Metric) -> list[int]:
    return list(cfg.passkey_lengths) if metric.key in ("passed", "answer_entropy") else cfg.lengths


def per_seed(metric: Metric, values: np.ndarray) -> list[float]:
    """Each seed's own estimate (a pass rate, a perplexity or a mean)."""
    means = values.mean(axis=1)
    return [float(math.exp(m)) if metric.exp else float(m) for m in means]


def statistics(cfg: Mini, values: dict) -> list[dict]:
    """One row per (arm, stream, metric, length): the pooled estimate and its 95 % interval, every seed's own."""
    rows = []
    for (arm, stream), by_key in values.items():
        for metric in (PPL, *METRICS.values()):
            for n in metric_lengths(cfg, metric):
                x = by_key[metric.key, n]
                interval = metric.interval(x)
                extra = {"passed": int(x.sum()), "trials": int(x.size)} if metric.rate else {}
                rows.append({"arm": arm, "stream": stream or "", "model": arm_label(arm, stream),
                             "metric": metric.key, "length": n, **interval.fields("value"), **extra,
                             "seeds": x.shape[0], "per_seed": per_seed(metric, x)})
    return rows


def interval_of(row: dict, name: str = "value") -> Interval:
    """The Interval whose ``Interval.fields(name)`` are in ``row``."""
    return Interval(row[name], row[f"{name}_low"], row[f"{name}_high"], row[f"{name}_n"],
                    "wilson" if "trials" in row else "bootstrap")


def verdicts(cfg: Mini, values: dict) -> list[dict]:
    """Per RoPE, stream, metric and length >= 2L: the 8L finetune, the L finetune and the training-free model with
    their intervals, claim 1 (``claim_1``), the L finetune minus the training-free model with its interval and
    claim 2 (``claim_2``)."""
    rows = []
    for rope in ROPE_NAMES:
        free = values[f"{rope}-free", None]
        for stream in cfg.stream_seeds():
            long, short = values[f"{rope}-8L", stream], values[f"{rope}-L", stream]
            for metric in METRICS.values():
                for n in metric_lengths(cfg, metric):
                    if n < 2 * cfg.L:
                        continue
                    iv = {k: metric.interval(v[metric.key, n]) for k, v in (("8L", long), ("L", short), ("free", free))}
                    diff = metric.difference(short[metric.key, n], free[metric.key, n][0])
                    rows.append({"rope": rope, "stream": stream, "metric": metric.key, "length": n,
                                 **{f: v for k, i in iv.items() for f, v in i.fields(k).items()},
                                 "claim_1": claim_1(metric, iv["8L"], iv["L"], iv["free"]),
                                 **diff.fields("L_minus_free"), "claim_2": claim_2(metric, diff)})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The summary: per length, every reversal named
# ----------------------------------------------------------------------------------------------------------------

def short_text(i: Interval, spec: str) -> str:
    """'2.31 [2.10, 2.52]', or '2.31' without an interval."""
    return f"{i.estimate:{spec}}" + (f" [{i.low:{spec}}, {i.high:{spec}}]" if i.known else "")


SPEC = {"passed": ".2f", "answer_entropy": ".2f", "last_query_entropy": ".2f", "nll_last_L": ".1f", "nll": ".1f"}


def stat_index(stats: list[dict]) -> dict:
    return {(r["arm"], r["stream"], r["metric"], r["length"]): r for r in stats}


def against_claim(cfg: Mini, at: dict, rope: str, stream: str, metric: Metric) -> list[str]:
    """Every length (of all, not only >= 2L) where the 8L finetune's estimate is on the other side of the L
    finetune's than claim 1 says, with both numbers."""
    flips = []
    for n in metric_lengths(cfg, metric):
        a, b = at[f"{rope}-8L", stream, metric.key, n], at[f"{rope}-L", stream, metric.key, n]
        if (a["value"] > b["value"]) if metric.better == "lower" else (a["value"] < b["value"]):
            flips.append(f"{n} ({a['value']:{SPEC[metric.key]}} vs {b['value']:{SPEC[metric.key]}})")
    return flips


def retrieval_lines(cfg: Mini, at: dict, rope: str, stream: str, head: str) -> list[str]:
    """Where the 8L finetune loses retrieval inside L, and where the L finetune beats it at 2L: the pooled pass
    rates with their Wilson intervals and whether they separate."""
    parts = []
    for n in [m for m in cfg.passkey_lengths if m <= 2 * cfg.L]:
        a, b = (interval_of(at[f"{rope}-{arm}", stream, "passed", n]) for arm in ("8L", "L"))
        way = {"lower": "below", "higher": "above"}.get(compare(a, b), "not separable from")
        parts.append(f"{n}: 8L {short_text(a, '.2f')} vs L {short_text(b, '.2f')} ({way} L's)")
    if not parts:
        return []
    versus = lambda n, a, b: compare(*(interval_of(at[f"{rope}-{arm}", stream, "passed", n])  # noqa: E731
                                      for arm in (a, b)))
    lost = [n for n in cfg.passkey_lengths if n <= cfg.L and versus(n, "8L", "L") == "lower"]
    plain = [f"the 8L finetune loses retrieval inside L at {', '.join(map(str, lost))}" if lost else
             "the 8L finetune does not lose retrieval inside L (no interval separated below the L finetune's)"]
    if 2 * cfg.L in cfg.passkey_lengths:
        plain.append("the L finetune wins at 2L" if versus(2 * cfg.L, "L", "8L") == "higher" else
                     "the L finetune does not win at 2L (no interval separated above the 8L finetune's)")
    return [f"{head}: passkey pass rate up to 2L: " + "; ".join(parts) + ". So " + " and ".join(plain) + "."]


def finding(cfg: Mini, stats: list[dict], rows: list[dict]) -> list[str]:
    """The paper's claims in this run's numbers: per stream, RoPE and metric, at each length >= 2L, the 8L / L
    finetune / training-free estimates with their intervals and the two verdicts; every length where 8L vs L
    goes against claim 1; retrieval up to 2L. Nothing is pooled over lengths."""
    at = stat_index(stats)
    lines = []
    for stream in cfg.stream_seeds():
        seeds = len(cfg.stream_seeds()[stream])
        for rope in ROPE_NAMES:
            head = f"{ROPE_NAMES[rope]} x8, {stream} stream ({seeds} finetune seed{'s' * (seeds > 1)})"
            for metric in METRICS.values():
                mine = [r for r in rows if (r["rope"], r["stream"], r["metric"]) == (rope, stream, metric.key)]
                cells = "; ".join(f"{r['length']}: " + " / ".join(short_text(interval_of(r, k), SPEC[metric.key])
                                                                  for k in ("8L", "L", "free"))
                                  + f", claim 1 {r['claim_1']}, claim 2 {r['claim_2']}" for r in mine)
                flips = against_claim(cfg, at, rope, stream, metric)
                lines.append(f"{head}, {metric.label}, 8L / L finetune / training-free (n = {mine[0]['8L_n']} / "
                             f"{mine[0]['L_n']} / {mine[0]['free_n']}): {cells}. 8L vs L against claim 1 at: "
                             f"{', '.join(flips) if flips else 'no length'}.")
            lines += retrieval_lines(cfg, at, rope, stream, head)
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------

STYLES = {"rope": ("black", "-"), "free": ("#555555", ":"), "L": ("#0072B2", "--"), "8L": ("#D55E00", "-")}


def draw_curves(cfg: Mini, stats: list[dict], metric: Metric, path: Path, log_y: bool = False,
                reference: bool = False) -> None:
    """One panel per RoPE: the pretrained model, the training-free extension and the finetunes (the mixed stream
    thick, the text-only stream thin) against length, each with its 95 % interval as a band; L and 8L marked."""
    from matplotlib.ticker import ScalarFormatter
    plt = pyplot()
    at = stat_index(stats)
    lengths = metric_lengths(cfg, metric)
    fig, axes = plt.subplots(1, len(ROPE_NAMES), figsize=(12, 4.4), sharey=True, layout="constrained")
    for ax, rope in zip(axes, ROPE_NAMES):
        for arm, stream in [("rope", None), *[(a, s) for a, s in arms(cfg) if a.startswith(rope)]]:
            rows = [at[arm, stream or "", metric.key, n] for n in lengths]
            color, line = STYLES[arm.split("-")[-1]]
            width = 1.0 if stream == "text" else 1.8
            y = np.array([r["value"] for r in rows])
            ax.plot(lengths, y, color=color, linestyle=line, linewidth=width, marker="o", markersize=3,
                    alpha=0.6 if stream == "text" else 1.0, label=arm_label(arm, stream))
            if all(r["value_low"] is not None for r in rows):
                ax.fill_between(lengths, [r["value_low"] for r in rows], [r["value_high"] for r in rows], color=color,
                                alpha=0.08 if stream == "text" else 0.15, linewidth=0)
        if reference:
            ax.plot(lengths, [math.log(n) for n in lengths], color="grey", linewidth=1, label="ln n (uniform)")
        for x, text in ((cfg.L, "L"), (8 * cfg.L, "8L")):
            ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
            ax.text(x, 1.0, f" {text}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_title(f"{ROPE_NAMES[rope]} x{cfg.factor:g}", fontsize=10)
        ax.set_xlabel("context length (tokens)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel(metric.label)
    fig.suptitle(f"{metric.label}: mean and 95 % interval (bands) over finetune seeds and units", fontsize=10)
    save_figure(fig, path)


def pooled_cells(out: Path, cfg: Mini, arm: str, stream: str | None) -> list[dict]:
    """An arm's passkey cells with its seeds' trials pooled: per (length, depth), trials, passed, pass rate and
    the mean answer entropy over the pooled trials."""
    by_model = [{(c["length"], c["depth"]): c for c in read_rows(out / "passkey" / m, "passkey", ("length", "depth"))}
                for m in arm_models(cfg, arm, stream)]
    cells = []
    for n in cfg.passkey_lengths:
        for d in cfg.depths:
            row = [b[n, d] for b in by_model]
            trials, passed = sum(c["trials"] for c in row), sum(c["passed"] for c in row)
            cells.append({"length": n, "depth": d, "trials": trials, "passed": passed, "pass_rate": passed / trials,
                          "entropy": float(np.mean([h for c in row for h in c["entropy_trials"]]))})
    return cells


def trained_len(out: Path, cfg: Mini, arm: str, stream: str | None) -> int:
    """Where a heatmap panel's dashed line goes: the length the arm's models were last trained at (a finetune's
    own; the training-free extensions were only ever trained at L), as their config.json says."""
    return trained_length(model_folder(out, arm_models(cfg, arm, stream)[0]))


def draw_all(out: Path, cfg: Mini, stats: list[dict]) -> None:
    for stream in cfg.stream_seeds():
        for rope in ROPE_NAMES:
            panels = [("rope", None), (f"{rope}-free", None), (f"{rope}-L", stream), (f"{rope}-8L", stream)]
            seeds = len(cfg.stream_seeds()[stream])
            draw_heatmaps([(arm_label(a, s) + (f", {seeds} seeds pooled" if s and seeds > 1 else ""),
                            pooled_cells(out, cfg, a, s), trained_len(out, cfg, a, s)) for a, s in panels],
                          list(cfg.passkey_lengths), list(cfg.depths),
                          out / f"heatmap_{rope}{'' if stream == 'mixed' else '_' + stream}.png",
                          title=f"passkey, {ROPE_NAMES[rope]} x{cfg.factor:g} (L = {cfg.L}), {stream} stream")
    draw_curves(cfg, stats, PPL, out / "ppl.png", log_y=True)
    for key, name in (("nll_last_L", "ppl_last_L"), ("answer_entropy", "passkey_entropy"), ("passed", "pass_rate")):
        draw_curves(cfg, stats, METRICS[key], out / f"{name}.png", log_y=key == "nll_last_L")
    draw_curves(cfg, stats, METRICS["last_query_entropy"], out / "last_query_entropy.png", reference=True)


# ----------------------------------------------------------------------------------------------------------------
# Results and the report section
# ----------------------------------------------------------------------------------------------------------------

def token_rows(out: Path, cfg: Mini) -> list[dict]:
    """Per trained model: the length, rows per step, steps and tokens it was trained with, its stream's digest."""
    rows = []
    for name in ["pretrained", *(f.name for f in finetunes(cfg))]:
        folder = out / "pretrained" if name == "pretrained" else out / "finetunes" / name
        trained = json.loads((folder / "config.json").read_text())["ropelite"]["trained"]
        timing = json.loads((folder / "timing.json").read_text())
        rows.append({"model": name, "len": trained["len"], "sequences_per_step": trained["sequences_per_step"],
                     "steps": trained["steps"], "tokens": trained["tokens"],
                     "stream_sha256": trained["data"].get("stream_sha256", ""), "cpu_s": timing["cpu_s"],
                     "wall_s": timing["wall_s"]})
    return rows


def sanity(cfg: Mini, at: dict, floor: dict) -> dict:
    """The checks that make the miniature mean something: a language model (perplexity at L against count models
    on the same windows), short-context (its last-L perplexity past L), retrieving within L."""
    value = lambda metric, n: interval_of(at["rope", "", metric, n])  # noqa: E731
    return {"ppl_at_L": value("nll", cfg.L).fields("ppl_at_L"), **{f"{k}_ppl_at_L": floor[k].fields(k) for k in floor},
            "ppl_last_L": {n: value("nll_last_L", n).fields("ppl") for n in cfg.lengths},
            "passkey": {n: {k: at["rope", "", "passed", n][k] for k in ("passed", "trials")}
                        for n in cfg.passkey_lengths}}


def wide(cfg: Mini, at: dict, metric: Metric) -> tuple[list[dict], list[str]]:
    """Arms as rows, lengths as columns: each cell the estimate and its 95 % interval (pass rates also k/n and
    the per-seed rates)."""
    spec = SPEC[metric.key]
    lengths = metric_lengths(cfg, metric)
    long = []
    for arm, stream in arms(cfg):
        for n in lengths:
            r = at[arm, stream or "", metric.key, n]
            text = short_text(interval_of(r), spec)
            if metric.rate:
                text = f"{r['passed']}/{r['trials']} " + text + (
                    " (" + ", ".join(f"{v:.2f}" for v in r["per_seed"]) + ")" if r["seeds"] > 1 else "")
            long.append({"model": arm_label(arm, stream), "length": n, "value": text})
    return pivot(long, "model", "length", "value"), ["model", *map(str, lengths)]


def verdict_table(cfg: Mini, rows: list[dict], stream: str) -> str:
    table = []
    for r in rows:
        if r["stream"] != stream:
            continue
        metric, spec = METRICS[r["metric"]], SPEC[r["metric"]]
        shown = lambda k, spec=spec: short_text(interval_of(r, k), spec)  # noqa: E731
        table.append({"RoPE": ROPE_NAMES[r["rope"]], "metric": metric.label, "length": r["length"],
                      "8L finetune": shown("8L"), "L finetune": shown("L"), "training-free": shown("free"),
                      "claim 1": r["claim_1"],
                      "L - free (perplexity: L / free)": shown("L_minus_free", ".3f" if metric.exp else spec),
                      "claim 2": r["claim_2"]})
    return markdown_table(table, limit=200)


def window_table(windows: list[Window], overlaps: list[float]) -> str:
    rows = [{"window": i, "kind": w.kind, "pieces (document, token offset, tokens)":
             "; ".join(f"{d} {o}+{t}" for d, o, t in w.pieces), "12-word runs seen in training": f"{100 * o:.2f} %"}
            for i, (w, o) in enumerate(zip(windows, overlaps))]
    return markdown_table(rows, limit=100)


def near_text() -> str:
    m = METRICS
    return (f"entropy +-{m['answer_entropy'].near:g} nats, pass rate +-{m['passed'].near:g}, last-L perplexity a "
            f"ratio within x/÷{math.exp(m['nll_last_L'].near):.2f}")


def section(out: Path, cfg: Mini, at: dict, rows: list[dict], windows: list[Window], overlaps: list[float],
            split: Split, tokens: list[dict], s: dict, floor: dict) -> str:
    L = cfg.L
    shortest = PasskeyDocuments(load_tokenizer(out / "pretrained"), L).shortest
    seeds = ", ".join(map(str, cfg.seeds))
    trials = len(cfg.depths) * cfg.keys
    within = ", ".join(f"{n}: {v['passed']}/{v['trials']}" for n, v in s["passkey"].items())
    tail = " -> ".join(f"{short_text(interval_of(r, 'ppl'), '.1f')} @{n}" for n, r in s["ppl_last_L"].items())
    ppl_rows, ppl_cols = wide(cfg, at, PPL)
    tables = {key: wide(cfg, at, METRICS[key]) for key in METRICS}
    dropped = ", ".join(f"{n} ({100 * v:.1f} %)" for n, v in split.dropped) or "none"
    return "\n".join([
        f"The miniature: a {cfg.layers}-layer LLaMa (hidden {cfg.hidden}, {cfg.heads} heads x "
        f"{cfg.hidden // cfg.heads}, SwiGLU {cfg.ffn}, sentencepiece vocabulary {cfg.vocab}) pretrained once from "
        f"scratch at L = {L} with plain RoPE (pretraining seed {cfg.pretrain.seed}: it does not vary); NTK "
        f"(b s^(d/(d-2))) and YaRN at s = {cfg.factor:g}, each finetuned at L and at 8L = {8 * L}.\n",
        f"**Same tokens.** Each finetune reads {cfg.finetune.tokens:,} tokens in {cfg.finetune.steps} steps of "
        f"{cfg.finetune.sequences * cfg.finetune.length:,} ({cfg.finetune.sequences} rows of L or "
        f"{cfg.finetune.at_length(8 * L).sequences} of 8L), lr {cfg.finetune.lr:g} "
        f"(warmup {cfg.finetune.warmup}, linear to 0). The tokens come from one stream per stream kind and seed, "
        f"built from blocks of L that do not depend on the row length and cut into rows of L or 8L, so both arms "
        f"read the same tokens in the same order with the same loss weights (the stream digest in the table below "
        f"is the same for the four finetunes of a stream and seed). Mixed stream (seeds {seeds}: the text's "
        f"document order and the blocks' draws vary): {cfg.finetune.mix.p_passkey:.0%} of the blocks start with a "
        f"passkey document of {shortest}..{L} tokens (uniform, as pretraining's; answer tokens weighted "
        f"x{cfg.finetune.mix.answer_weight:g}), {cfg.finetune.mix.p_copy:.0%} are copy blocks, the rest text. Text "
        f"stream (seed {', '.join(map(str, cfg.text_seeds))}): text only, to tell whether the finding needs "
        f"retrieval supervision in the finetune.\n",
        f"**Held out.** {len(windows)} windows of {max(cfg.lengths)} tokens (below, by document and token offset). "
        f"Pydoc topics and stdlib modules sharing more than {OVERLAP_LIMIT:.0%} of their {WORD_RUN}-word runs are "
        f"grouped and every {HOLDOUT_EVERY}th group is held out whole; each book's last "
        f"{BOOK_HELD_OUT:.0%} is held out from a line break. At most {OVERLAP_LIMIT:.0%} of any window's "
        f"{WORD_RUN}-word runs occur verbatim in the training text (the largest here "
        f"{100 * max(overlaps):.2f} %). Held-out documents dropped by that rule: {dropped}.\n",
        window_table(windows, overlaps),
        f"**Passkey.** {cfg.keys} keys x {len(cfg.depths)} depths = {trials} trials per length per model, the same "
        f"keys for every model (seed {EVAL_KEY_SEED}, never looked at while the recipe was made), needle.py's "
        f"plain prompt and cells (the shortest passkey prompt takes {shortest} tokens, so the grid starts above "
        f"L/2); entropy = Algorithm 1 over the answer's tokens.\n",
        f"**Intervals and verdicts** (rules fixed before the run). Every number is a mean with its 95 % interval: "
        f"Wilson's for a pass rate (the trials of all seeds pooled; the per-seed rates follow in brackets), else a "
        f"percentile bootstrap (seed {BOOTSTRAP_SEED}, seeds and units resampled independently) over finetune "
        f"seeds and held-out windows or passkey trials (for a single model, the training-free ones and the text "
        f"stream's one seed, over its windows or trials only); a perplexity is exp of the mean NLL. At each "
        f"length >= 2L, "
        f"claim 1 (the 8L finetune's entropy is below both the L finetune's and the training-free model's; its "
        f"pass rate above; its perplexity below) *holds* when both pairs of intervals separate that way, *does not "
        f"hold* when either separates the other way, and is *unclear* otherwise. Claim 2 (the L finetune stays near "
        f"the training-free model) *holds* when the 95 % interval of their difference on the same units (L finetune "
        f"minus training-free, per seed and unit) lies within a margin ({near_text()}), *does not hold* when it lies "
        f"wholly outside it, and is *unclear* otherwise.\n",
        "**Sanity checks** (pretrained model): held-out perplexity at L "
        f"{short_text(interval_of(at['rope', '', 'nll', L]), '.1f')}, against a bigram count model's "
        f"{short_text(floor['bigram'], '.1f')} and a unigram's {short_text(floor['unigram'], '.1f')} on the same "
        f"windows; perplexity of the last L tokens {tail}; passkey {within}.\n",
        "Tokens of each training run:\n",
        markdown_table(tokens, ["model", "len", "sequences_per_step", "steps", "tokens", "stream_sha256", "cpu_s",
                                "wall_s"], limit=100),
        *[part for stream in cfg.stream_seeds()
          for part in (f"Verdicts, {stream} stream:\n", verdict_table(cfg, rows, stream))],
        "Passkey pass rate per length, trials passed / run, pooled rate and its Wilson interval (per-seed rates):\n",
        markdown_table(*tables["passed"], limit=100),
        "Mean attention entropy of the passkey answer (nats):\n", markdown_table(*tables["answer_entropy"], limit=100),
        f"Perplexity of the last L = {L} tokens of each length (the whole prefix as context):\n",
        markdown_table(*tables["nll_last_L"], limit=100),
        "Perplexity, truncate protocol (the first n tokens of each window):\n", markdown_table(ppl_rows, ppl_cols,
                                                                                               limit=100),
        "Last query's attention entropy on the held-out windows (nats; uniform over n keys is ln n):\n",
        markdown_table(*tables["last_query_entropy"], limit=100),
    ])


def count_floor(out: Path, cfg: Mini, train_docs: list[str], windows: list[Window]) -> dict[str, Interval]:
    """The unigram and bigram count models' perplexity at L on the windows, with bootstrap intervals."""
    tok = load_tokenizer(out / "pretrained")
    stream = token_stream(train_docs, tok)
    per_window = [count_model_nll(stream, tok.vocab_size, w.ids, [cfg.L])[0] for w in windows]
    return {k: bootstrap_mean([r[k] for r in per_window], seed=BOOTSTRAP_SEED, transform=math.exp)
            for k in ("unigram", "bigram")}


def report(out: Path, cfg: Mini, split: Split, windows: list[Window], overlaps: list[float],
           timing: dict) -> list[str]:
    """Write every result file and figure, section.md (which paper.py puts in its report) and the summary;
    returns the finding lines."""
    values = arm_values(out, cfg)
    stats = statistics(cfg, values)
    rows = verdicts(cfg, values)
    at = stat_index(stats)
    write_results(out, "ablation", stats)
    write_results(out, "verdicts", rows)
    write_csv(out / "passkey.csv", [{"model": m, **{k: c[k] for k in ("length", "depth", "trials", "passed",
                                                                          "pass_rate", "entropy")}}
                                    for m in model_names(cfg)
                                    for c in read_rows(out / "passkey" / m, "passkey", ("length", "depth"))])
    tokens = token_rows(out, cfg)
    write_results(out, "tokens", tokens)
    write_json(out / "windows.json", [{"kind": w.kind, "pieces": w.pieces, "overlap": o}
                                      for w, o in zip(windows, overlaps)])
    draw_all(out, cfg, stats)
    floor = count_floor(out, cfg, split.train, windows)
    checks = sanity(cfg, at, floor)
    (out / "section.md").write_text(section(out, cfg, at, rows, windows, overlaps, split, tokens, checks, floor))
    lines = finding(cfg, stats, rows)
    write_summary(out, "ablation", TITLE, PAPER_CLAIM, lines,
                  {"verdicts": rows, "sanity": checks, "windows": len(windows), "seeds": list(cfg.seeds),
                   "text_seeds": list(cfg.text_seeds), "this_invocation": timing})
    return lines
