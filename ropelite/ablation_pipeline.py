"""The miniature's run (``ablation.py`` is its command line): the stages that make every model and its numbers in
a run folder, the worker processes that run the models side by side, and ``run_mini``, the whole of it.

- ``pretrain``: pretrained/, the split's tokenizer and a LLaMa trained from scratch at L (``MixedRows``).
- ``build_stream``: streams/STREAMSEED.npz, one finetuning stream (``finetune_stream``) per stream and seed,
  which the L and 8L finetunes of both RoPEs read (``StreamRows``).
- ``finetune``: finetunes/NAME/, one ``Finetune`` from the pretrained model.
- ``evaluate``: eval/NAME.json (``window_rows`` on every held-out window) and passkey/NAME/ (the passkey grid,
  ``ropelite.haystack``'s cells).
- ``run_task`` (one model's finetune and evaluation, the worker processes' entry point) and ``run_tasks`` (all
  of them, in this process or in spawned ones).
- ``run_mini``: all the stages, then ``ropelite.ablation_report.report``.

Each stage writes its folder or file atomically, and a rerun with the same folder skips what is finished (a
trained model folder is never retrained; a model's passkey grid goes on from its first cell not done).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .ablation import (OVERLAP_LIMIT, WORD_RUN, MixedRows, PasskeyDocuments, Recipe, StreamRows, Window,
                       finetune_stream, heldout_windows, split_documents, token_stream, train, train_tokenizer,
                       window_overlaps, window_rows)
from .ablation_design import EVAL_KEY_SEED, FREE, Finetune, Mini, finetunes, model_folder, model_names
from .ablation_report import report
from .cli import DTYPES, check, token_bar
from .haystack import MAX_NEW_TOKENS, passkey_cell, passkey_haystack, passkeys
from .hf import load_model, save_model
from .io import read_rows, write_json, write_results
from .model import LlamaConfig
from .rope import RopeConfig
from .tokenizer import load_tokenizer
from .training import random_model

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


def train_with_bar(model, rows, recipe: Recipe, desc: str, dtype: torch.dtype, bars: bool) -> list[dict]:
    bar = token_bar(recipe.tokens, desc) if bars else None

    def on_step(row: dict) -> None:
        if bar is not None:
            bar.update(recipe.sequences * recipe.length)
            bar.set_postfix_str(f"loss {row['loss']:.3f}")

    log = train(model, rows, recipe, on_step, dtype)
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
        tok = train_tokenizer(train_docs, tmp, cfg.vocab)
        tokenizer_s = clock.read()
        stream = token_stream(train_docs, tok)
        config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.ffn,
                             num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                             num_key_value_heads=cfg.heads, head_dim=cfg.hidden // cfg.heads,
                             bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                             rope=RopeConfig(theta=10000.0, original_max_position_embeddings=cfg.L))
        model = random_model(config, cfg.pretrain.seed)
        rows = MixedRows(stream, PasskeyDocuments(tok, cfg.L), cfg.L, cfg.pretrain.mix, cfg.pretrain.seed)
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
    """streams/STREAMSEED.npz: the finetuning stream (``finetune_stream``) of ``stream`` and ``seed``, as long
    as one finetune's budget, made once and read by all four finetunes of that stream and seed."""
    path = stream_path(out, stream, seed)
    if path.is_file():
        return
    tok = load_tokenizer(out / "pretrained")
    text = token_stream(train_docs, tok, seed)
    ids, weights = finetune_stream(text, PasskeyDocuments(tok, cfg.L), cfg.L, cfg.mix(stream), seed,
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
    and tokens per step on the rows of its stream (``StreamRows``): the L and 8L arms of one stream and seed
    read the same tokens."""
    folder = out / "finetunes" / ft.name
    if folder.is_dir():
        return
    recipe = dataclasses.replace(cfg.finetune.at_length(cfg.L * ft.times), mix=cfg.mix(ft.stream), seed=ft.seed)
    ids, weights = read_stream(out, ft.stream, ft.seed)
    with stage_folder(folder) as tmp:
        clock = Clock()
        model = load_model(out / "pretrained", rope=ft.rope, factor=cfg.factor)
        rows = StreamRows(ids, weights, recipe.length)
        log = train_with_bar(model, rows, recipe, f"{ft.name} (len {recipe.length})", dtype, bars)
        data = {"builtin": list(cfg.kinds), "stream": ft.stream, "stream_sha256": digest(ids, weights)}
        record = recipe.record(model.config, "pretrained", str(out / "pretrained"), data)
        save_trained(model, tmp, out / "pretrained", log, record, clock, {"dtype": str(dtype)})


def load_named(out: Path, cfg: Mini, name: str, dtype: torch.dtype):
    rope = FREE[name][0] if name in FREE else None
    return load_model(model_folder(out, name), rope=rope, factor=cfg.factor if rope else None, dtype=dtype)


def evaluate(out: Path, cfg: Mini, name: str, windows: list[Window], dtype: torch.dtype, bars: bool) -> None:
    """eval/NAME.json: per length, each window's mean NLL (truncate protocol, and of the last L tokens) and last
    query entropy (``window_rows``); passkey/NAME/passkey.json: the passkey grid, ropelite.haystack's cells
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
        per_window = [window_rows(model, w.ids, cfg.lengths, cfg.L) for w in windows]
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


def run_task(out: Path, cfg: Mini, name: str, windows: list[Window], dtype: str, threads: int | None,
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


def run_tasks(out: Path, cfg: Mini, windows: list[Window], dtype: str, workers: int,
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
# The whole miniature
# ----------------------------------------------------------------------------------------------------------------

def run_mini(out: Path, cfg: Mini = Mini(), workers: int = 1, threads: int | None = None,
             dtype: str = "fp32") -> list[str]:
    """The whole miniature; stages already finished in ``out`` are skipped. Returns the finding lines."""
    clock = Clock()
    split = split_documents(cfg.kinds)
    pretrain(out, cfg, split.train, DTYPES[dtype])
    tok = load_tokenizer(out / "pretrained")  # every model's: the finetunes' folders hold copies of it
    windows = heldout_windows(split.held, tok, max(cfg.lengths), cfg.windows_per_kind)
    overlaps = window_overlaps(windows, tok, split.train)
    worst = max(range(len(windows)), key=overlaps.__getitem__)
    check(overlaps[worst] <= OVERLAP_LIMIT,
          f"held-out window {worst} ({windows[worst].pieces}) has {100 * overlaps[worst]:.2f} % of its "
          f"{WORD_RUN}-word runs in the training text (at most {OVERLAP_LIMIT:.0%})")
    for stream, seeds in cfg.stream_seeds().items():
        for seed in seeds:
            build_stream(out, cfg, split.train, stream, seed)
    timing = {"before_tasks": clock.read(), "tasks": run_tasks(out, cfg, windows, dtype, workers, threads)}
    timing["total"] = clock.read()
    return report(out, cfg, split, windows, overlaps, timing)
