"""The seed paper's third finding, token-matched finetuning at L vs 8L (Zhong et al. 2024, Figure 4 e-f), as one run.

    python ablation.py                              # the miniature on a CPU -> runs/ablation
    python ablation.py --workers 1                  # everything in this process, a progress bar per model
    python ablation.py --dtype bf16                 # bf16 training (autocast) and evaluation (bf16 weights)
    python ablation.py --scale paper --device cuda  # SmolLM2 (trained at 8K): finetunes at 8K and 32K, grids to 64K
    python ablation.py --scale paper --dry-run      # print the paper-scale commands and stop

mini (no short-context LLaMa exists offline, so it trains its own; ropelite.ablation holds the pieces):
  1. the built-in books, prose and code split so that nothing held out was trained on (at most 1 % of any
     held-out window's 12-word runs occur verbatim in the training text; overlapping pydoc topics and modules
     are held out or trained on as whole groups, each book's tail is cut at a line break), a sentencepiece
     tokenizer.model (LLaMa-2 style) on the training text, then a 2-layer LLaMa pretrained from scratch at
     L = 128 with plain RoPE, on text plus passkey documents (the evaluation's own prompt, answer tokens
     weighted x10, a curriculum on their length) and copy rows;
  2. two finetuning streams, each built ONCE per finetune seed and cut into rows of L or of 8L, so the two arms
     consume the same tokens in the same order with the same loss weights: "mixed" (text, passkey documents of
     at most L tokens, copy blocks; seeds 1, 2, 3) and "text" (text only; seed 1). NTK (b' = b s^(d/(d-2)))
     and YaRN at s = 8 are finetuned at L and at 8L on each: 16 finetunes, same steps, schedule and tokens
     per step (8L takes 1/8 the rows);
  3. every model (pretrained, the two training-free extensions, the finetunes) on the same held-out windows:
     perplexity at L..16L (truncate protocol, and the last L tokens of each length), the last query's attention
     entropy, and needle.py's passkey grid (ropelite.haystack's cells; the same 10 keys x 3 depths per length
     for every model) with Algorithm 1's entropy per trial;
  4. every number as its mean and 95 % interval (Wilson for pass rates, pooled over seeds; a seeded bootstrap
     over seeds and windows or trials for the rest), a verdict per claim and per length from the intervals,
     figures with the intervals, section.md and ablation_summary.json.
paper: the same pipeline with the project's scripts (train.py, eval_ppl.py, needle.py) on SmolLM2: NTK base
  1e5 -> 1e6 and YaRN x4, finetunes at 8K and 32K with 20M tokens each, passkey and needle grids to 64K.

Each stage writes its folder or file atomically, and a rerun with the same --out skips what is finished (a
trained model folder is never retrained; a model's passkey grid goes on from its first cell not done).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import ropelite  # noqa: F401  (before torch, so that OpenMP waits passively: ropelite/__init__.py)
import torch
from tqdm import tqdm

from ropelite import ablation as lib
from ropelite.cli import DTYPES, ArgumentParser, check, run_script, token_bar
from ropelite.hf import load_model, save_model, trained_length
from ropelite.haystack import MAX_NEW_TOKENS, draw_heatmaps, passkey_cell, passkey_haystack, passkeys
from ropelite.io import (lock_out, markdown_table, pivot, pyplot, read_rows, save_figure, write_csv, write_json,
                         write_results, write_summary)
from ropelite.model import LlamaConfig
from ropelite.rope import RopeConfig
from ropelite.stats import Interval
from ropelite.tokenizer import load_tokenizer
from ropelite.training import latest_checkpoint, random_model

HERE = Path(__file__).resolve().parent
WORKERS = min(2, os.cpu_count() or 1)
TITLE = "Longer finetuning contexts, same tokens: attention entropy, retrieval and perplexity"
PAPER_CLAIM = ("\"we finetune models on 4K and 32K training lengths with the same tokens on NTK ... models trained "
               "in more extended contexts exhibited significantly lower attention uncertainty ... The Needle test "
               "pass rates improved significantly, especially in longer testing contexts. Conversely, models trained "
               "with the same number of tokens but shorter context sizes showed little to no change in attention "
               "entropy\" (Zhong et al. 2024, §4.3)")
# The evaluation's passkeys (haystack.passkeys' seed). The recipe was made in earlier runs that looked at seed 0's
# first 7 keys of every cell; these keys were never looked at before the recipe was fixed.
EVAL_KEY_SEED = 1


@dataclasses.dataclass(frozen=True)
class Mini:
    """Every size of the miniature. The pretraining is run C of the exploration (a 0.94M-parameter model, 5.1M
    tokens); the finetune recipe is the one earlier runs settled on (327,680 tokens in 160 steps of 2,048, lr 1e-3,
    YaRN's linear schedule, the pretraining's mix), unchanged here: nothing is tuned on these results."""
    L: int = 128
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    ffn: int = 384
    vocab: int = 2000
    factor: float = 8.0
    pretrain: lib.Recipe = lib.Recipe(length=128, sequences=16, steps=2500, lr=5e-3, warmup=100, schedule="cosine",
                                      min_lr_ratio=0.1, mix=lib.Mix(curriculum=8000), seed=0)
    # 16 rows of L or 2 of 8L per step, cut from one stream (lib.finetune_stream) per seed
    finetune: lib.Recipe = lib.Recipe(length=128, sequences=16, steps=160, lr=1e-3, warmup=10, schedule="linear",
                                      mix=lib.Mix())
    kinds: tuple[str, ...] = ("books", "prose", "code")
    ppl_multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    windows_per_kind: int = 4
    passkey_lengths: tuple[int, ...] = (96, 128, 256, 512, 1024, 2048)
    depths: tuple[int, ...] = (10, 50, 90)
    keys: int = 10                         # per (length, depth): 30 trials per length per model
    seeds: tuple[int, ...] = (1, 2, 3)     # finetune seeds of the mixed stream (its document order and draws)
    text_seeds: tuple[int, ...] = (1,)     # of the text-only stream

    @property
    def lengths(self) -> list[int]:
        return [m * self.L for m in self.ppl_multiples]

    def stream_seeds(self) -> dict[str, tuple[int, ...]]:
        return {"mixed": self.seeds, "text": self.text_seeds}

    def mix(self, stream: str) -> lib.Mix:
        return self.finetune.mix if stream == "mixed" else lib.TEXT_ONLY


ROPE_NAMES = {"ntk": "NTK", "yarn": "YaRN"}
# name -> (rope override of the pretrained model, label): the models that were not finetuned
FREE = {"rope": (None, "pretrained (RoPE)"), "ntk-free": ("ntk", "NTK x8, training-free"),
        "yarn-free": ("yarn", "YaRN x8, training-free")}
STREAM_LABELS = {"mixed": "", "text": ", text-only stream"}


@dataclasses.dataclass(frozen=True)
class Finetune:
    """One finetuned model: a RoPE at cfg.factor, trained at ``times`` x L on stream ``stream`` of seed ``seed``."""
    rope: str
    times: int
    stream: str
    seed: int

    @property
    def arm(self) -> str:
        return f"{self.rope}-{'8L' if self.times > 1 else 'L'}"

    @property
    def name(self) -> str:
        return f"{self.arm}.{self.stream}{self.seed}"


def finetunes(cfg: Mini) -> list[Finetune]:
    return [Finetune(rope, times, stream, seed) for stream, seeds in cfg.stream_seeds().items() for seed in seeds
            for rope in ROPE_NAMES for times in (1, 8)]


def model_names(cfg: Mini) -> list[str]:
    return [*FREE, *(f.name for f in finetunes(cfg))]


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
    """Wall and CPU seconds (all threads of this process and of its finished workers) since it was made."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), self.cpu_now()

    @staticmethod
    def cpu_now() -> float:
        t = os.times()  # this process's threads and its finished child processes (the workers), user + system
        return t.user + t.system + t.children_user + t.children_system

    def read(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.wall, 1), "cpu_s": round(self.cpu_now() - self.cpu, 1)}


def train_with_bar(model, rows, recipe: lib.Recipe, desc: str, dtype: torch.dtype, bars: bool) -> list[dict]:
    bar = token_bar(recipe.tokens, desc) if bars else None

    def on_step(row: dict) -> None:
        if bar is not None:
            bar.update(recipe.sequences * recipe.length)
            bar.set_postfix_str(f"loss {row['loss']:.3f}")

    log = lib.train(model, rows, recipe, on_step, dtype)
    if bar is not None:
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


def pretrain(out: Path, cfg: Mini, train_docs: list[str], dtype: torch.dtype) -> None:
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
        log = train_with_bar(model, rows, cfg.pretrain, f"pretrain L={cfg.L}", dtype, bars=True)
        record = cfg.pretrain.record(model.config, "random", None, {"builtin": list(cfg.kinds)})
        save_trained(model, tmp, tmp, log, record, clock,
                     {"tokenizer": tokenizer_s, "stream_tokens": int(stream.size), "dtype": str(dtype),
                      "parameters": sum(p.numel() for p in model.parameters())})


def stream_path(out: Path, stream: str, seed: int) -> Path:
    return out / "streams" / f"{stream}{seed}.npz"


def digest(ids: np.ndarray, weights: np.ndarray) -> str:
    """sha256 of a stream's tokens and weights: two finetunes that record the same digest read the same data."""
    return hashlib.sha256(ids.astype(np.int64).tobytes() + weights.astype(np.float32).tobytes()).hexdigest()[:16]


def build_stream(out: Path, cfg: Mini, train_docs: list[str], stream: str, seed: int) -> None:
    """streams/STREAMSEED.npz: the finetuning stream (``lib.finetune_stream``) of ``stream`` and ``seed``, as long
    as one finetune's budget, made once and read by all four finetunes of that stream and seed."""
    path = stream_path(out, stream, seed)
    if path.is_file():
        return
    tok = load_tokenizer(out / "pretrained")
    text = lib.token_stream(train_docs, tok, seed)
    ids, weights = lib.finetune_stream(text, lib.PasskeyDocuments(tok, cfg.L), cfg.L, cfg.mix(stream), seed,
                                       cfg.finetune.tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, ids=ids, weights=weights)
    os.replace(tmp, path)


def read_stream(out: Path, stream: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(stream_path(out, stream, seed)) as data:
        return data["ids"], data["weights"]


def finetune(out: Path, cfg: Mini, ft: Finetune, dtype: torch.dtype, bars: bool) -> None:
    """``ft.rope`` at cfg.factor from the pretrained model, trained at ``ft.times`` x L with cfg.finetune's steps
    and tokens per step on the rows of its stream (``lib.StreamRows``): the L and 8L arms of one stream and seed
    read the same tokens."""
    folder = out / "finetunes" / ft.name
    if folder.is_dir():
        return
    recipe = dataclasses.replace(cfg.finetune.at_length(cfg.L * ft.times), mix=cfg.mix(ft.stream), seed=ft.seed)
    ids, weights = read_stream(out, ft.stream, ft.seed)
    with stage_folder(folder) as tmp:
        clock = Clock()
        model = load_model(out / "pretrained", rope=ft.rope, factor=cfg.factor)
        rows = lib.StreamRows(ids, weights, recipe.length)
        log = train_with_bar(model, rows, recipe, f"{ft.name} (len {recipe.length})", dtype, bars)
        data = {"builtin": list(cfg.kinds), "stream": ft.stream, "stream_sha256": digest(ids, weights)}
        record = recipe.record(model.config, "pretrained", str(out / "pretrained"), data)
        save_trained(model, tmp, out / "pretrained", log, record, clock, {"dtype": str(dtype)})


def model_folder(out: Path, name: str) -> Path:
    return out / "pretrained" if name in FREE else out / "finetunes" / name


def load_named(out: Path, cfg: Mini, name: str, dtype: torch.dtype):
    rope = FREE[name][0] if name in FREE else None
    return load_model(model_folder(out, name), rope=rope, factor=cfg.factor if rope else None, dtype=dtype)


def evaluate(out: Path, cfg: Mini, name: str, windows: list[lib.Window], dtype: torch.dtype, bars: bool) -> None:
    """eval/NAME.json: per length, each window's mean NLL (truncate protocol, and of the last L tokens) and last
    query entropy (``lib.window_rows``); passkey/NAME/passkey.json: the passkey grid, ropelite.haystack's cells
    (needle.py's prompt, scorer and Algorithm 1 entropy) with the keys of EVAL_KEY_SEED, written after every
    cell, so a rerun goes on from the first cell not done."""
    path, passkey_out = out / "eval" / f"{name}.json", out / "passkey" / name
    cells = read_rows(passkey_out, "passkey", keys=("length", "depth"))
    done = {(c["length"], c["depth"]) for c in cells}
    todo = [(n, d) for n in cfg.passkey_lengths for d in cfg.depths if (n, d) not in done]
    if path.is_file() and not todo:
        return
    clock = Clock()
    model = load_named(out, cfg, name, dtype)
    if not path.is_file():
        per_window = [lib.window_rows(model, w.ids, cfg.lengths, cfg.L) for w in windows]
        rows = [{"length": n, **{k: [w[j][k] for w in per_window] for k in ("nll", "nll_last_L", "last_query_entropy")}}
                for j, n in enumerate(cfg.lengths)]
        write_json(path, {"name": name, "rope": model.config.rope.describe(), "windows": len(windows),
                          "dtype": str(next(model.parameters()).dtype), "rows": rows, "timing": clock.read()})
    if todo:
        hay = passkey_haystack(load_tokenizer(model_folder(out, name)), list(cfg.passkey_lengths),
                               MAX_NEW_TOKENS["passkey"], chat=False)
        bar = token_bar(sum(n for n, _ in todo) * cfg.keys, f"passkey {name}") if bars else None
        for n, d in todo:
            start = time.perf_counter()
            cell = passkey_cell(model, hay, n, d, passkeys(EVAL_KEY_SEED, n, d, cfg.keys))
            cells.append({"model": name, "rope": model.config.rope.describe(), "length": n, "depth": d, **cell,
                          "seconds": round(time.perf_counter() - start, 2)})
            write_results(passkey_out, "passkey", cells)
            if bar is not None:
                bar.update(n * cfg.keys)
        if bar is not None:
            bar.close()


def run_task(out: Path, cfg: Mini, name: str, windows: list[lib.Window], dtype: str, threads: int | None,
             bars: bool) -> tuple[str, dict]:
    """One independent unit of work: finetune ``name`` (unless it is a training-free model) and evaluate it.
    Worker processes run these with ``threads`` torch threads each."""
    if threads:
        torch.set_num_threads(threads)
    clock = Clock()
    ft = next((f for f in finetunes(cfg) if f.name == name), None)
    if ft is not None:
        finetune(out, cfg, ft, DTYPES[dtype], bars)
    evaluate(out, cfg, name, windows, DTYPES[dtype], bars)
    return name, clock.read()


def run_tasks(out: Path, cfg: Mini, windows: list[lib.Window], dtype: str, workers: int,
              threads: int | None) -> dict:
    """Every model's ``run_task``: in this process one after another (workers = 1, with progress bars), or in
    ``workers`` processes (spawned, so no thread pool is inherited), one bar over the models. Returns each task's
    wall and CPU seconds."""
    names = model_names(cfg)
    if workers == 1:
        return dict(run_task(out, cfg, name, windows, dtype, None, True) for name in names)
    timing = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        jobs = [pool.submit(run_task, out, cfg, name, windows, dtype, threads, False) for name in names]
        try:
            with tqdm(total=len(jobs), desc=f"finetune + evaluate ({workers} processes)", unit="model") as bar:
                for job in concurrent.futures.as_completed(jobs):
                    name, clock = job.result()
                    timing[name] = clock
                    bar.update(1)
                    bar.set_postfix_str(f"{name} {clock['wall_s']:.0f} s")
        except BaseException:
            for job in jobs:      # a failed or interrupted run stops at once: what finished is kept (resume)
                job.cancel()
            raise
    return timing


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


PPL = lib.Metric("nll", "perplexity (truncate protocol)", "lower", math.log(1.1), exp=True)  # tables only


def metric_lengths(cfg: Mini, metric: lib.Metric) -> list[int]:
    return list(cfg.passkey_lengths) if metric.key in ("passed", "answer_entropy") else cfg.lengths


def per_seed(metric: lib.Metric, values: np.ndarray) -> list[float]:
    """Each seed's own estimate (a pass rate, a perplexity or a mean)."""
    means = values.mean(axis=1)
    return [float(math.exp(m)) if metric.exp else float(m) for m in means]


def statistics(cfg: Mini, values: dict) -> list[dict]:
    """One row per (arm, stream, metric, length): the pooled estimate and its 95 % interval, every seed's own."""
    rows = []
    for (arm, stream), by_key in values.items():
        for metric in (PPL, *lib.METRICS.values()):
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
    their intervals, claim 1 (``lib.claim_1``), the L finetune minus the training-free model with its interval and
    claim 2 (``lib.claim_2``)."""
    rows = []
    for rope in ROPE_NAMES:
        free = values[f"{rope}-free", None]
        for stream in cfg.stream_seeds():
            long, short = values[f"{rope}-8L", stream], values[f"{rope}-L", stream]
            for metric in lib.METRICS.values():
                for n in metric_lengths(cfg, metric):
                    if n < 2 * cfg.L:
                        continue
                    iv = {k: metric.interval(v[metric.key, n]) for k, v in (("8L", long), ("L", short), ("free", free))}
                    diff = metric.difference(short[metric.key, n], free[metric.key, n][0])
                    rows.append({"rope": rope, "stream": stream, "metric": metric.key, "length": n,
                                 **{f: v for k, i in iv.items() for f, v in i.fields(k).items()},
                                 "claim_1": lib.claim_1(metric, iv["8L"], iv["L"], iv["free"]),
                                 **diff.fields("L_minus_free"), "claim_2": lib.claim_2(metric, diff)})
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


def against_claim(cfg: Mini, at: dict, rope: str, stream: str, metric: lib.Metric) -> list[str]:
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
        way = {"lower": "below", "higher": "above"}.get(lib.compare(a, b), "not separable from")
        parts.append(f"{n}: 8L {short_text(a, '.2f')} vs L {short_text(b, '.2f')} ({way} L's)")
    if not parts:
        return []
    versus = lambda n, a, b: lib.compare(*(interval_of(at[f"{rope}-{arm}", stream, "passed", n])  # noqa: E731
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
            for metric in lib.METRICS.values():
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


def draw_curves(cfg: Mini, stats: list[dict], metric: lib.Metric, path: Path, log_y: bool = False,
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
        draw_curves(cfg, stats, lib.METRICS[key], out / f"{name}.png", log_y=key == "nll_last_L")
    draw_curves(cfg, stats, lib.METRICS["last_query_entropy"], out / "last_query_entropy.png", reference=True)


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
            "passkey": {n: {k: at["rope", "", "passed", n][k] for k in ("passed", "trials")} for n in cfg.passkey_lengths}}


def wide(cfg: Mini, at: dict, metric: lib.Metric) -> tuple[list[dict], list[str]]:
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
        metric, spec = lib.METRICS[r["metric"]], SPEC[r["metric"]]
        shown = lambda k, spec=spec: short_text(interval_of(r, k), spec)  # noqa: E731
        table.append({"RoPE": ROPE_NAMES[r["rope"]], "metric": metric.label, "length": r["length"],
                      "8L finetune": shown("8L"), "L finetune": shown("L"), "training-free": shown("free"),
                      "claim 1": r["claim_1"],
                      "L - free (perplexity: L / free)": shown("L_minus_free", ".3f" if metric.exp else spec),
                      "claim 2": r["claim_2"]})
    return markdown_table(table, limit=200)


def window_table(windows: list[lib.Window], overlaps: list[float]) -> str:
    rows = [{"window": i, "kind": w.kind, "pieces (document, token offset, tokens)":
             "; ".join(f"{d} {o}+{t}" for d, o, t in w.pieces), "12-word runs seen in training": f"{100 * o:.2f} %"}
            for i, (w, o) in enumerate(zip(windows, overlaps))]
    return markdown_table(rows, limit=100)


def near_text() -> str:
    m = lib.METRICS
    return (f"entropy +-{m['answer_entropy'].near:g} nats, pass rate +-{m['passed'].near:g}, last-L perplexity a "
            f"ratio within x/÷{math.exp(m['nll_last_L'].near):.2f}")


def section(out: Path, cfg: Mini, at: dict, rows: list[dict], windows: list[lib.Window], overlaps: list[float],
            split: lib.Split, tokens: list[dict], s: dict, floor: dict) -> str:
    L = cfg.L
    shortest = lib.PasskeyDocuments(load_tokenizer(out / "pretrained"), L).shortest
    seeds = ", ".join(map(str, cfg.seeds))
    trials = len(cfg.depths) * cfg.keys
    within = ", ".join(f"{n}: {v['passed']}/{v['trials']}" for n, v in s["passkey"].items())
    tail = " -> ".join(f"{short_text(interval_of(r, 'ppl'), '.1f')} @{n}" for n, r in s["ppl_last_L"].items())
    ppl_rows, ppl_cols = wide(cfg, at, PPL)
    tables = {key: wide(cfg, at, lib.METRICS[key]) for key in lib.METRICS}
    dropped = ", ".join(f"{n} ({100 * v:.1f} %)" for n, v in split.dropped) or "none"
    return "\n".join([
        f"The miniature: a {cfg.layers}-layer LLaMa (hidden {cfg.hidden}, {cfg.heads} heads x "
        f"{cfg.hidden // cfg.heads}, SwiGLU {cfg.ffn}, sentencepiece vocabulary {cfg.vocab}) pretrained once from scratch at L = {L} with "
        f"plain RoPE (pretraining seed {cfg.pretrain.seed}: it does not vary); NTK (b s^(d/(d-2))) and YaRN at "
        f"s = {cfg.factor:g}, each finetuned at L and at 8L = {8 * L}.\n",
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
        f"Pydoc topics and stdlib modules sharing more than {lib.OVERLAP_LIMIT:.0%} of their {lib.WORD_RUN}-word runs are "
        f"grouped and every {lib.HOLDOUT_EVERY}th group is held out whole; each book's last "
        f"{lib.BOOK_HELD_OUT:.0%} is held out from a line break. At most {lib.OVERLAP_LIMIT:.0%} of any window's "
        f"{lib.WORD_RUN}-word runs occur verbatim in the training text (the largest here "
        f"{100 * max(overlaps):.2f} %). Held-out documents dropped by that rule: {dropped}.\n",
        window_table(windows, overlaps),
        f"**Passkey.** {cfg.keys} keys x {len(cfg.depths)} depths = {trials} trials per length per model, the same "
        f"keys for every model (seed {EVAL_KEY_SEED}, never looked at while the recipe was made), needle.py's "
        f"plain prompt and cells (the shortest passkey prompt takes {shortest} tokens, so the grid starts above "
        f"L/2); entropy = Algorithm 1 over the answer's tokens.\n",
        f"**Intervals and verdicts** (rules fixed before the run). Every number is a mean with its 95 % interval: "
        f"Wilson's for a pass rate (the trials of all seeds pooled; the per-seed rates follow in brackets), else a "
        f"percentile bootstrap (seed {lib.BOOTSTRAP_SEED}, seeds and units resampled independently) over finetune "
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


def count_floor(out: Path, cfg: Mini, train_docs: list[str], windows: list[lib.Window]) -> dict[str, Interval]:
    """The unigram and bigram count models' perplexity at L on the windows, with bootstrap intervals."""
    tok = load_tokenizer(out / "pretrained")
    stream = lib.token_stream(train_docs, tok)
    per_window = [lib.count_model_nll(stream, tok.vocab_size, w.ids, [cfg.L])[0] for w in windows]
    return {k: lib.bootstrap_mean([r[k] for r in per_window], seed=lib.BOOTSTRAP_SEED, transform=math.exp)
            for k in ("unigram", "bigram")}


def report(out: Path, cfg: Mini, split: lib.Split, windows: list[lib.Window], overlaps: list[float],
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


# ----------------------------------------------------------------------------------------------------------------
# The two scales
# ----------------------------------------------------------------------------------------------------------------

def run_mini(out: Path, cfg: Mini = Mini(), workers: int = 1, threads: int | None = None,
             dtype: str = "fp32") -> list[str]:
    """The whole miniature; stages already finished in ``out`` are skipped. Returns the finding lines."""
    clock = Clock()
    split = lib.split_documents(cfg.kinds)
    pretrain(out, cfg, split.train, DTYPES[dtype])
    tok = load_tokenizer(out / "pretrained")  # every model's: the finetunes' folders hold copies of it
    windows = lib.heldout_windows(split.held, tok, max(cfg.lengths), cfg.windows_per_kind)
    overlaps = lib.window_overlaps(windows, tok, split.train)
    worst = max(range(len(windows)), key=overlaps.__getitem__)
    check(overlaps[worst] <= lib.OVERLAP_LIMIT,
          f"held-out window {worst} ({windows[worst].pieces}) has {100 * overlaps[worst]:.2f} % of its "
          f"{lib.WORD_RUN}-word runs in the training text (at most {lib.OVERLAP_LIMIT:.0%})")
    for stream, seeds in cfg.stream_seeds().items():
        for seed in seeds:
            build_stream(out, cfg, split.train, stream, seed)
    timing = {"before_tasks": clock.read(), "tasks": run_tasks(out, cfg, windows, dtype, workers, threads)}
    timing["total"] = clock.read()
    return report(out, cfg, split, windows, overlaps, timing)


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
    p.add_argument("--workers", type=int, default=WORKERS,
                   help="mini: processes that run the 19 independent finetunes and evaluations side by side, "
                        f"after the pretraining (default {WORKERS}: min(2, this machine's cores); 1 runs them in "
                        "this process, with a progress bar each)")
    p.add_argument("--threads", type=int, default=1,
                   help="mini: torch threads per process, the pretraining's and each worker's (default 1: on 2 "
                        "cores shared with other jobs 2 threads trained this model ~10x slower than 1)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="mini: fp32 (default), or bf16 for training (autocast over fp32 weights) and evaluation "
                        "(bf16 weights; the loss's softmax, the perplexity's logits and the entropies in fp32); "
                        "it can only be faster on CPUs that multiply bf16 natively (AMX or AVX512-BF16)")
    p.add_argument("--out", default="runs/ablation", help="run folder; a rerun skips finished stages "
                                                          "(default runs/ablation)")
    p.add_argument("--dry-run", action="store_true", help="--scale paper: print the commands and stop")
    args = p.parse_args(argv)
    check(args.workers >= 1, "--workers must be at least 1")
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
    lines = run_mini(out, workers=args.workers, threads=args.threads, dtype=args.dtype)
    print((out / "section.md").read_text())
    print("finding:\n" + "\n".join(lines) + f"\n({clock.read()} for this run; results in {out})")


if __name__ == "__main__":
    run_script(main)
