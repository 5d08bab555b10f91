"""The seed paper's third finding, token-matched finetuning at L vs 8L (Zhong et al. 2024, Figure 4 e-f), as one run.

    python ablation.py                              # the miniature on a CPU: ~10 minutes on 2 cores -> runs/ablation
    python ablation.py --out runs/abl --threads 1   # one torch thread: what cores shared with other jobs want
    python ablation.py --scale paper --device cuda  # SmolLM2 (trained at 8K): finetunes at 8K and 32K, grids to 64K
    python ablation.py --scale paper --dry-run      # print the paper-scale commands and stop

mini (no short-context LLaMa exists offline, so it trains its own; ropelite.ablation holds the pieces):
  1. a sentencepiece tokenizer.model (LLaMa-2 style) on the built-in books, prose and code (held-out documents
     kept apart), then a 2-layer LLaMa pretrained from scratch at L = 128 with plain RoPE, on text plus passkey
     documents (the evaluation's own prompt, answer tokens weighted x10, a curriculum on their length) and
     copy rows;
  2. NTK (b' = b s^(d/(d-2))) and YaRN at s = 8, each finetuned twice with the SAME tokens: at L and at 8L
     (8L takes 1/8 the sequences per step; same steps, learning-rate schedule and data seed);
  3. every model (pretrained, the two training-free extensions, the four finetunes) on the same held-out text:
     perplexity at L..16L (truncate protocol, and the last L tokens of each length), the last query's attention
     entropy, and needle.py's passkey grid (its cells, ropelite.haystack; same keys for every model) with
     Algorithm 1's entropy per cell;
  4. ablation.json / .csv, passkey.csv, heatmaps (dashed line at each model's own training length), the
     perplexity and entropy figures, section.md (tables, sanity checks) and ablation_summary.json (the finding
     as measured, per length past 2L, beside the paper's claim).
paper: the same pipeline with the project's scripts (train.py, eval_ppl.py, needle.py) on SmolLM2: NTK base
  1e5 -> 1e6 and YaRN x4, finetunes at 8K and 32K with 20M tokens each, passkey and needle grids to 64K.

Each stage writes its folder or file atomically, and a rerun with the same --out skips what is finished (a
trained model folder is never retrained; a model's passkey grid goes on from its first cell not done).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ropelite import ablation as lib
from ropelite.cli import ArgumentParser, check, run_script, token_bar
from ropelite.hf import load_model, save_model, trained_length
from ropelite.haystack import MAX_NEW_TOKENS, draw_heatmaps, passkey_cell, passkey_haystack, passkeys
from ropelite.io import (lock_out, markdown_table, pivot, pyplot, read_rows, read_summaries, save_figure, write_csv,
                         write_json, write_results, write_summary)
from ropelite.model import LlamaConfig
from ropelite.rope import RopeConfig
from ropelite.stats import compare, wilson
from ropelite.tokenizer import Tokenizer, load_tokenizer
from ropelite.training import latest_checkpoint, random_model

HERE = Path(__file__).resolve().parent
PAPER_CLAIM = ("\"we finetune models on 4K and 32K training lengths with the same tokens on NTK ... models trained "
               "in more extended contexts exhibited significantly lower attention uncertainty ... The Needle test "
               "pass rates improved significantly, especially in longer testing contexts. Conversely, models trained "
               "with the same number of tokens but shorter context sizes showed little to no change in attention "
               "entropy\" (Zhong et al. 2024, §4.3)")


@dataclasses.dataclass(frozen=True)
class Mini:
    """Every size of the miniature. The recipe is run C of notes/ablation-exploration.md."""
    L: int = 128
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    ffn: int = 384
    vocab: int = 2000
    factor: float = 8.0
    pretrain: lib.Recipe = lib.Recipe(length=128, sequences=16, steps=2500, lr=5e-3, warmup=100, schedule="cosine",
                                      min_lr_ratio=0.1, mix=lib.Mix(curriculum=8000), seed=0)
    # 327,680 tokens as the exploration's 40 x 8,192, cut into 160 steps of 2,048 (16 rows at L, 2 at 8L): more
    # updates to re-learn the copy circuit that s = 8 breaks; the pretraining mix; YaRN's linear schedule
    finetune: lib.Recipe = lib.Recipe(length=128, sequences=16, steps=160, lr=1e-3, warmup=10, schedule="linear",
                                      mix=lib.Mix(), seed=1)
    kinds: tuple[str, ...] = ("books", "prose", "code")
    ppl_multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    docs_per_kind: int = 3
    passkey_lengths: tuple[int, ...] = (96, 128, 256, 512, 1024, 2048)
    depths: tuple[int, ...] = (10, 50, 90)
    trials: int = 7

    @property
    def lengths(self) -> list[int]:
        return [m * self.L for m in self.ppl_multiples]


# name -> (folder it loads, training-free rope override, label); the order of every table and figure
MODELS = {
    "rope": ("pretrained", None, "pretrained (RoPE)"),
    "ntk-free": ("pretrained", "ntk", "NTK x8, training-free"),
    "ntk-L": ("ntk-L", None, "NTK x8, finetuned at L"),
    "ntk-8L": ("ntk-8L", None, "NTK x8, finetuned at 8L"),
    "yarn-free": ("pretrained", "yarn", "YaRN x8, training-free"),
    "yarn-L": ("yarn-L", None, "YaRN x8, finetuned at L"),
    "yarn-8L": ("yarn-8L", None, "YaRN x8, finetuned at 8L"),
}
ROPE_NAMES = {"ntk": "NTK", "yarn": "YaRN"}
FINETUNES = {name: (name.split("-")[0], 8 if name.endswith("8L") else 1) for name in MODELS if name[-1] == "L"}


# ----------------------------------------------------------------------------------------------------------------
# Stages: each one's output appears in one rename, so a finished stage is there whole or not at all
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def stage_folder(folder: Path):
    """A temporary sibling folder, renamed to ``folder`` when the block ends without an error."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    os.replace(tmp, folder)


class Clock:
    """Wall and CPU seconds (all threads of this process) since it was made."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.wall, 1), "cpu_s": round(time.process_time() - self.cpu, 1)}


def train_with_bar(model, rows: lib.MixedRows, recipe: lib.Recipe, desc: str) -> list[dict]:
    bar = token_bar(recipe.tokens, desc)

    def on_step(row: dict) -> None:
        bar.update(recipe.sequences * recipe.length)
        bar.set_postfix_str(f"loss {row['loss']:.3f}")

    log = lib.train(model, rows, recipe, on_step)
    bar.close()
    return log


def save_trained(model, folder: Path, tokenizer_from: Path, log: list[dict], record: dict, clock: Clock,
                 extra: dict | None = None) -> None:
    """A model folder that ropelite and transformers load: weights, config.json with the ``ropelite`` ``record``
    (the RoPE, and how it was trained: ``Recipe.record``), the tokenizer, log.jsonl and timing.json."""
    save_model(model, folder, extra_config={"ropelite": record})
    if tokenizer_from != folder:
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / name, folder / name)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    write_json(folder / "timing.json", {**clock.read(), "tokens": record["trained"]["tokens"], **(extra or {})})


def pretrain(out: Path, cfg: Mini, train_docs: list[str]) -> None:
    folder = out / "pretrained"
    if folder.is_dir():
        print(f"pretrained: {folder} exists, skipped", file=sys.stderr)
        return
    with stage_folder(folder) as tmp:
        clock = Clock()
        tok = lib.train_tokenizer(train_docs, tmp, cfg.vocab)
        tokenizer_s = clock.read()
        stream = lib.token_stream(train_docs, tok)
        config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.ffn,
                             num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                             num_key_value_heads=cfg.heads, head_dim=cfg.hidden // cfg.heads,
                             bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                             rope=RopeConfig(theta=10000.0, original_max_position_embeddings=cfg.L))
        model = random_model(config, cfg.pretrain.seed)
        rows = lib.MixedRows(stream, lib.PasskeyDocuments(tok, cfg.L), cfg.L, cfg.pretrain.mix, cfg.pretrain.seed)
        log = train_with_bar(model, rows, cfg.pretrain, f"pretrain L={cfg.L}")
        record = cfg.pretrain.record(model.config, "random", None, {"builtin": list(cfg.kinds)})
        save_trained(model, tmp, tmp, log, record, clock,
                     {"tokenizer": tokenizer_s, "stream_tokens": int(stream.size),
                      "parameters": sum(p.numel() for p in model.parameters())})


def finetune(out: Path, cfg: Mini, name: str, tok: Tokenizer, stream: np.ndarray) -> None:
    """NTK or YaRN at cfg.factor, trained at L or 8L with cfg.finetune's token budget, on ``stream`` (the
    training text in the pretrained tokenizer ``tok``)."""
    folder = out / name
    if folder.is_dir():
        print(f"{name}: {folder} exists, skipped", file=sys.stderr)
        return
    rope, times = FINETUNES[name]
    recipe = cfg.finetune.at_length(cfg.L * times)
    with stage_folder(folder) as tmp:
        clock = Clock()
        model = load_model(out / "pretrained", rope=rope, factor=cfg.factor)
        rows = lib.MixedRows(stream, lib.PasskeyDocuments(tok, recipe.length), recipe.length, recipe.mix,
                             recipe.seed)
        log = train_with_bar(model, rows, recipe, f"{name} ({rope} x{cfg.factor:g}, len {recipe.length})")
        record = recipe.record(model.config, "pretrained", str(out / "pretrained"), {"builtin": list(cfg.kinds)})
        save_trained(model, tmp, out / "pretrained", log, record, clock)


PASSKEY_SEED = 0  # the keys' seed: every model answers the same keys


def evaluate(out: Path, cfg: Mini, name: str, docs: list[np.ndarray]) -> dict:
    """eval/NAME.json: perplexities and last-query entropy per length on ``docs`` (the held-out windows, in the
    pretrained tokenizer that every model shares); passkey/NAME/passkey.json: the passkey grid, ropelite.haystack's
    cells (needle.py's prompt, scorer and Algorithm 1 entropy), written after every cell, so a rerun goes on from
    the first cell not done."""
    path, passkey_out = out / "eval" / f"{name}.json", out / "passkey" / name
    folder, rope, label = MODELS[name]
    cells = read_rows(passkey_out, "passkey", keys=("length", "depth"))
    done = {(c["length"], c["depth"]) for c in cells}
    todo = [(n, d) for n in cfg.passkey_lengths for d in cfg.depths if (n, d) not in done]
    if path.is_file() and not todo:
        return json.loads(path.read_text())
    clock = Clock()
    model = load_model(out / folder, rope=rope, factor=cfg.factor if rope else None)
    if not path.is_file():
        rows = lib.language_model_rows(model, docs, cfg.lengths, cfg.L)
        write_json(path, {"name": name, "label": label, "rope": model.config.rope.describe(), "docs": len(docs),
                          "rows": rows, "timing": clock.read()})
    if todo:
        hay = passkey_haystack(load_tokenizer(out / folder), list(cfg.passkey_lengths), MAX_NEW_TOKENS["passkey"],
                               chat=False)
        bar = token_bar(sum(n for n, _ in todo) * cfg.trials, f"passkey {name}")
        for n, d in todo:
            start = time.perf_counter()
            cell = passkey_cell(model, hay, n, d, passkeys(PASSKEY_SEED, n, d, cfg.trials))
            cells.append({"model": name, "rope": model.config.rope.describe(), "length": n, "depth": d, **cell,
                          "seconds": round(time.perf_counter() - start, 2)})
            write_results(passkey_out, "passkey", cells)
            bar.update(n * cfg.trials)
        bar.close()
    return json.loads(path.read_text())


def passkey_cells(out: Path, name: str) -> list[dict]:
    return read_rows(out / "passkey" / name, "passkey", keys=("length", "depth"))


# ----------------------------------------------------------------------------------------------------------------
# Results, figures and the report section
# ----------------------------------------------------------------------------------------------------------------

def train_len_of(out: Path, name: str) -> int:
    """Where a model's dashed line goes: the length it was last trained at (a finetune's own --len; the
    training-free extensions were only ever trained at L)."""
    return trained_length(out / MODELS[name][0])


def heatmap_panels(out: Path, names: list[str]) -> list[tuple[str, list[dict], int]]:
    return [(MODELS[n][2], passkey_cells(out, n), train_len_of(out, n)) for n in names]


def token_rows(out: Path) -> list[dict]:
    """Per trained model: the length, rows per step, steps and tokens it was trained with."""
    rows = []
    for name in ["pretrained", *FINETUNES]:
        trained = json.loads((out / name / "config.json").read_text())["ropelite"]["trained"]
        timing = json.loads((out / name / "timing.json").read_text())
        rows.append({"model": name, "len": trained["len"], "sequences_per_step": trained["sequences_per_step"],
                     "steps": trained["steps"], "tokens": trained["tokens"], "cpu_s": timing["cpu_s"],
                     "wall_s": timing["wall_s"]})
    return rows


def draw_curves(results: dict, key: str, ylabel: str, path: Path, L: int, log_y: bool = False,
                reference: bool = False) -> None:
    """One line per model of rows[key] against length, the training lengths L and 8L marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2), layout="constrained")
    styles = {"rope": ("black", "o", "-"), "ntk": ("#0072B2", "s", None), "yarn": ("#D55E00", "^", None)}
    lengths = sorted({r["length"] for res in results.values() for r in res["rows"]})
    for name, res in results.items():
        color, marker, line = styles[name.split("-")[0]]
        line = line or {"free": ":", "L": "--", "8L": "-"}[name.split("-")[1]]
        rows = [r for r in res["rows"] if r.get(key) is not None]
        ax.plot([r["length"] for r in rows], [r[key] for r in rows], color=color, marker=marker, linestyle=line,
                label=MODELS[name][2])
    if reference:
        ax.plot(lengths, [math.log(n) for n in lengths], color="grey", linewidth=1, label="ln n (uniform)")
    for x, text in ((L, "L"), (8 * L, "8L")):
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.text(x, 1.0, f" {text}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="grey")
    from matplotlib.ticker import ScalarFormatter
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    fig.legend(fontsize=7, loc="outside right upper")
    save_figure(fig, path)


def wide(results: dict, fmt) -> tuple[list[dict], list[str]]:
    """Models as rows, lengths as columns, of one quantity (``fmt`` of each result row)."""
    lengths = sorted({r["length"] for res in results.values() for r in res["rows"]})
    long = [{"model": MODELS[n][2], "length": r["length"], "value": fmt(r)} for n, res in results.items()
            for r in res["rows"]]
    return pivot(long, "model", "length", "value"), ["model", *map(str, lengths)]


def past_2L(rows: list[dict], L: int) -> dict:
    """A model's passkey trials at the lengths past 2L (``rows``: lib.per_length's), pooled: trials, passed,
    pass rate with its Wilson interval, mean answer entropy over the trials; and the per-length rows."""
    past = [r for r in rows if r["length"] > 2 * L]
    trials = sum(r["trials"] for r in past)
    passed = sum(round(r["pass_rate"] * r["trials"]) for r in past)
    return {"lengths": [r["length"] for r in past], "trials": trials, "passed": passed, "pass_rate": passed / trials,
            "rate": wilson(passed, trials), "entropy": sum(r["entropy"] * r["trials"] for r in past) / trials,
            "per_length": past}


def direction(a: float, b: float) -> str:
    return "lower than" if a < b else "higher than" if a > b else "equal to"


def versus(long: dict, short: dict, key: str, shown) -> str:
    """How the 8L finetune's pooled ``key`` stands to the L finetune's, and every length where it goes the other
    way (``shown`` writes a per-length row's value), so that the pooled number hides no reversal."""
    way = direction(long[key], short[key])
    flips = [f"{a['length']} ({shown(a)} vs {shown(b)})" for a, b in zip(long["per_length"], short["per_length"])
             if direction(a[key], b[key]) != way]
    return f"the 8L finetune's is {way} the L finetune's" + (", except at " + ", ".join(flips) if flips
                                                             else " at every length")


INTERVALS = {"lower": "their intervals separate", "higher": "their intervals separate",
             "overlap": "their intervals overlap: the data cannot tell them apart",
             "unknown": "too few trials for an interval"}


def finding(results: dict, passkey: dict, L: int) -> tuple[list[str], dict]:
    """(finding lines, numbers): the paper's claim in this run's numbers, per RoPE, the 8L finetune against the
    L finetune and the training-free extension over the passkey lengths past 2L (mean answer entropy; pass rate,
    k/n trials with its Wilson 95 % interval), pooled and with every length where 8L vs L goes the other way;
    and the perplexity of the last L tokens at the longest length."""
    lines, numbers = [], {"L": L}
    entropy = lambda r: f"{r['entropy']:.3f}"  # noqa: E731
    passes = lambda r: f"{round(r['pass_rate'] * r['trials'])}/{r['trials']}"  # noqa: E731
    for rope in ("ntk", "yarn"):
        names = (f"{rope}-8L", f"{rope}-L", f"{rope}-free")
        if not any(r["length"] > 2 * L for r in passkey[names[0]]):
            lines.append(f"{ROPE_NAMES[rope]} x8: no passkey length past 2L = {2 * L}: nothing to compare.")
            continue
        m = {n: past_2L(passkey[n], L) for n in names}
        long, short = m[names[0]], m[names[1]]
        tail = {n: results[n]["rows"][-1] for n in names}
        who = f"{ROPE_NAMES[rope]} x8, 8L / L finetune / training-free"
        head = f"{who}, past 2L = {2 * L} ({', '.join(map(str, long['lengths']))})"
        entropies = " / ".join(entropy(m[n]) for n in names)
        rates = " / ".join(f"{passes(m[n])} {m[n]['rate'].text()}" for n in names)
        tails = " / ".join(f"{tail[n]['ppl_last_L']:.1f}" for n in names)
        lines += [
            f"{head}: mean answer entropy {entropies} nats (n = {long['trials']} trials each); "
            f"{versus(long, short, 'entropy', entropy)}.",
            f"{head}: passkey pass rate {rates}; {versus(long, short, 'pass_rate', passes)}; "
            f"{INTERVALS[compare(long['rate'], short['rate'])]}.",
            f"{who}: perplexity of the last L tokens at {tail[names[0]]['length']} {tails} "
            f"(n = {results[names[0]]['docs']} documents)."]
        numbers[rope] = {n: {**{k: v for k, v in m[n].items() if k not in ("rate", "pass_rate")},
                             **m[n]["rate"].fields("pass_rate"), "ppl_last_L": tail[n]["ppl_last_L"]} for n in names}
    return lines, numbers


def flat_rows(results: dict, passkey: dict) -> list[dict]:
    """One row per (model, length): perplexities, last-query entropy and the passkey summary at that length."""
    rows = []
    for name, res in results.items():
        at = {p["length"]: p for p in passkey[name]}
        for r in res["rows"]:
            p = at.get(r["length"], {})
            rows.append({"model": name, **r, **{f"passkey_{k}": p.get(k) for k in ("pass_rate", "entropy", "trials")}})
    return rows


def report(out: Path, cfg: Mini, results: dict, baseline: list[dict]) -> None:
    """Write every result file and figure, and section.md (which paper.py puts in its report)."""
    L = cfg.L
    cells = {n: passkey_cells(out, n) for n in results}
    passkey = {n: lib.per_length(c) for n, c in cells.items()}
    write_results(out, "ablation", flat_rows(results, passkey))
    write_csv(out / "passkey.csv", [{"model": n, **{k: c[k] for k in ("length", "depth", "trials", "passed",
                                                                          "pass_rate", "entropy")}}
                                    for n, cs in cells.items() for c in cs])
    write_csv(out / "passkey_by_length.csv", [{"model": n, **r} for n, rows in passkey.items() for r in rows])
    tokens = token_rows(out)
    write_results(out, "tokens", tokens)
    for group in ("ntk", "yarn"):
        names = ["rope", *[n for n in MODELS if n.startswith(group)]]
        draw_heatmaps(heatmap_panels(out, names), list(cfg.passkey_lengths), list(cfg.depths),
                      out / f"heatmap_{group}.png", title=f"passkey, {ROPE_NAMES[group]} x{cfg.factor:g} (L = {L})")
    draw_curves(results, "ppl", "perplexity (truncate protocol)", out / "ppl.png", L, log_y=True)
    draw_curves(results, "ppl_last_L", f"perplexity of the last L = {L} tokens", out / "ppl_last_L.png", L, log_y=True)
    draw_curves({n: {"rows": passkey[n]} for n in results}, "entropy", "mean answer attention entropy (nats)",
                out / "passkey_entropy.png", L)
    draw_curves(results, "last_query_entropy", "last query's attention entropy (nats)", out / "last_query_entropy.png",
                L, reference=True)
    checks = sanity(results, passkey, baseline, L)
    (out / "section.md").write_text(section(out, cfg, results, passkey, baseline, tokens, checks))
    lines, numbers = finding(results, passkey, L)
    write_summary(out, "ablation", "Longer finetuning contexts, same tokens (Zhong et al. 2024, Figure 4 e-f)",
                  PAPER_CLAIM, lines, {**numbers, "sanity": checks})


def sanity(results: dict, passkey: dict, baseline: list[dict], L: int) -> dict:
    """The checks that make the miniature mean something: a language model, short-context, retrieving within L."""
    rope = {r["length"]: r for r in results["rope"]["rows"]}
    base = {r["length"]: r for r in baseline}
    within = {r["length"]: r["pass_rate"] for r in passkey["rope"] if r["length"] <= L}
    return {"ppl_at_L": rope[L]["ppl"], "bigram_ppl_at_L": base[L]["bigram_ppl"],
            "unigram_ppl_at_L": base[L]["unigram_ppl"],
            "ppl_last_L": {n: r["ppl_last_L"] for n, r in rope.items()},
            "passkey_within_L": within,
            "passkey_past_L": {r["length"]: r["pass_rate"] for r in passkey["rope"] if r["length"] > L}}


def section(out: Path, cfg: Mini, results: dict, passkey: dict, baseline: list[dict], tokens: list[dict],
            s: dict) -> str:
    L = cfg.L
    docs = results["rope"]["docs"]
    shortest = lib.PasskeyDocuments(load_tokenizer(out / "pretrained"), L).shortest
    pk = lambda r: f"{r['pass_rate']:.2f} / {r['entropy']:.2f}"  # noqa: E731
    ppl_rows, ppl_cols = wide(results, lambda r: f"{r['ppl']:.1f}")
    tail_rows, _ = wide(results, lambda r: f"{r['ppl_last_L']:.1f}")
    ent_rows, _ = wide(results, lambda r: f"{r['last_query_entropy']:.2f}")
    pk_rows, pk_cols = wide({n: {"rows": rows} for n, rows in passkey.items()}, pk)
    within = ", ".join(f"{n}: {v:.2f}" for n, v in s["passkey_within_L"].items())
    past = ", ".join(f"{n}: {v:.2f}" for n, v in s["passkey_past_L"].items())
    tail = " -> ".join(f"{v:.1f} @{n}" for n, v in s["ppl_last_L"].items())
    return "\n".join([
        f"The miniature: a {cfg.layers}-layer LLaMa (hidden {cfg.hidden}, {cfg.heads} heads x {cfg.hidden // cfg.heads}, "
        f"SwiGLU {cfg.ffn}, sentencepiece vocabulary {cfg.vocab}) pretrained from scratch at L = {L} with plain RoPE; "
        f"NTK (b s^(d/(d-2))) and YaRN at s = {cfg.factor:g}. Held-out text: {docs} documents of {16 * L} tokens "
        f"(books, prose, code never trained on). Passkey: {cfg.trials} keys x {len(cfg.depths)} depths per length, "
        f"the same keys for every model, needle.py's plain prompt and cells, ropelite.haystack's (with this "
        f"tokenizer the shortest passkey document "
        f"takes {shortest} tokens, so the grid starts above L/2); entropy = Algorithm 1 over the answer's tokens.\n",
        "**Sanity checks** (pretrained model): held-out perplexity at L "
        f"{s['ppl_at_L']:.1f}, against a bigram count model's {s['bigram_ppl_at_L']:.1f} and a unigram's "
        f"{s['unigram_ppl_at_L']:.1f} on the same tokens; perplexity of the last L tokens {tail}; passkey pass rate "
        f"within L {within}, past L {past} (n = {cfg.trials * len(cfg.depths)} trials per length).\n",
        "Tokens of each training run (the finetunes' budgets are equal by construction; the test checks it):\n",
        markdown_table(tokens, ["model", "len", "sequences_per_step", "steps", "tokens", "cpu_s", "wall_s"]),
        "Perplexity, truncate protocol (the first n tokens of each document):\n", markdown_table(ppl_rows, ppl_cols),
        f"Perplexity of the last L = {L} tokens of each length (the whole prefix as context):\n",
        markdown_table(tail_rows, ppl_cols),
        "Passkey pass rate / mean attention entropy of the answer (nats), per length over depths and trials "
        f"(n = {cfg.trials * len(cfg.depths)} trials per cell):\n",
        markdown_table(pk_rows, pk_cols),
        "Last query's attention entropy (nats; uniform over n keys is ln n):\n", markdown_table(ent_rows, ppl_cols),
        f"Count-model floor (truncate protocol): " + ", ".join(
            f"{r['length']}: bigram {r['bigram_ppl']:.1f}, unigram {r['unigram_ppl']:.1f}" for r in baseline) + ".\n",
    ])


# ----------------------------------------------------------------------------------------------------------------
# The two scales
# ----------------------------------------------------------------------------------------------------------------

def run_mini(out: Path, cfg: Mini = Mini()) -> dict:
    """The whole miniature; stages already finished in ``out`` are skipped."""
    train_docs, held = lib.split_documents(cfg.kinds)
    pretrain(out, cfg, train_docs)
    tok = load_tokenizer(out / "pretrained")  # every model's: the finetunes' folders hold copies of it
    stream = lib.token_stream(train_docs, tok)  # tokenised once for the finetunes and the count models
    for name in FINETUNES:
        finetune(out, cfg, name, tok, stream)
    docs = lib.heldout_windows(held, tok, max(cfg.lengths), cfg.docs_per_kind)
    results = {name: evaluate(out, cfg, name, docs) for name in MODELS}
    baseline = lib.count_model_rows(stream, tok.vocab_size, docs, cfg.lengths)
    report(out, cfg, results, baseline)
    return results


PAPER_ROPES = {"ntk": ["--rope", "ntk", "--base", "1e6"], "yarn": ["--rope", "yarn", "--factor", "4"]}
PAPER_LENGTHS = ["4096", "8192", "16384", "32768", "65536"]


def paper_commands(args) -> list[list[str]]:
    """The paper-scale run as the project's scripts: 4 token-matched finetunes (train.py), then perplexity
    (eval_ppl.py) and the passkey and needle grids (needle.py) of the base, the training-free extensions and
    the finetunes."""
    out, m = Path(args.out), ["--model", args.model, "--device", args.device]
    data = ["--data", *args.data] if args.data else ["--epochs-ok"]
    commands = []
    for rope, flags in PAPER_ROPES.items():
        for length in ("8192", "32768"):
            folder = out / f"{rope}-{length}"
            commands.append(["train.py", *m, *flags, "--len", length, "--tokens", "20971520", "--batch-tokens",
                             "262144", *data, "--out", str(folder), *(["--resume"] if latest_checkpoint(folder) else [])])
    evaluated = [("rope", m + ["--rope", "rope"]), *[(f"{r}-free", m + f) for r, f in PAPER_ROPES.items()],
                 *[(f"{r}-{n}", ["--model", str(out / f"{r}-{n}"), "--device", args.device])
                   for r in PAPER_ROPES for n in ("8192", "32768")]]
    for name, model in evaluated:
        commands.append(["eval_ppl.py", *model, "--lengths", *PAPER_LENGTHS, "--docs", "10", "--out", str(out / "ppl" / name)])
        commands.append(["needle.py", *model, "--task", "passkey", "--no-chat", "--lengths", *PAPER_LENGTHS,
                         "--depths", "0:100:5", "--trials", "5", "--out", str(out / "passkey" / name)])
        commands.append(["needle.py", *model, "--lengths", "4000:65536:16", "--depths", "0:100:10",
                         "--out", str(out / "needle" / name)])
    return commands


def run_paper(args) -> None:
    """Each command in its own process; the scripts resume from their folders (train.py on --resume)."""
    for argv in paper_commands(args):
        print("python " + " ".join(argv), flush=True)
        if args.dry_run:
            continue
        code = subprocess.call([sys.executable, str(HERE / argv[0]), *argv[1:]])
        check(code == 0, f"{argv[0]} failed with exit status {code}; rerun the same command to resume")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="ablation.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=("mini", "paper"), default="mini",
                   help="mini: train a small LLaMa of our own at L = 128 and run everything on a CPU (default); "
                        "paper: SmolLM2 finetuned at 8K and 32K with train.py, for a GPU")
    p.add_argument("--model", default="smollm2",
                   help="--scale paper: the pretrained model to extend (default smollm2); mini trains its own")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="--scale paper: the finetuning text for train.py (default: the built-in books, read "
                        "many times over)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; mini runs on cpu)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads for mini (default {torch.get_num_threads()}, torch's choice for this "
                        "machine; give 1 on cores shared with other jobs, where 2 threads ran ~7x slower)")
    p.add_argument("--out", default="runs/ablation", help="run folder; a rerun skips finished stages "
                                                          "(default runs/ablation)")
    p.add_argument("--dry-run", action="store_true", help="--scale paper: print the commands and stop")
    args = p.parse_args(argv)
    check(args.threads >= 1, "--threads must be at least 1")
    check(args.scale == "paper" or args.device == "cpu", "--scale mini runs on the cpu (it is sized for one)")
    check(args.scale == "paper" or not args.dry_run, "--dry-run is for --scale paper")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.scale == "paper":
        if not args.dry_run:
            lock_out(args.out)
        run_paper(args)
        return
    out = lock_out(args.out)
    torch.set_num_threads(args.threads)
    clock = Clock()
    run_mini(out)
    summary = next(s for s in read_summaries(out) if s["results"] == "ablation")
    print((out / "section.md").read_text())
    print("finding:\n" + "\n".join(summary["finding"]) + f"\n({clock.read()} for this run; results in {out})")


if __name__ == "__main__":
    run_script(main)
