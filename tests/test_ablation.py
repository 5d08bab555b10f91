"""The ablation miniature (ablation.py over ropelite/ablation.py, ablation_design.py, ablation_pipeline.py and
ablation_report.py): both arms of a finetune consume the same tokens with the same weights, the finetuning
stream's blocks, the pretraining rows, the held-out windows' overlap with the training text (at most 1 %), the
weighted loss against plain cross-entropy, its training step being train.py's own, the one-forward evaluation
against separate ones, the verdict rules, the summary naming every reversal, resume of the whole pipeline (a tiny
configuration of a few seconds), the worker processes and the paper-scale commands."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ablation
from ropelite import ablation as lib
from ropelite import ablation_design as design
from ropelite import ablation_pipeline as pipeline
from ropelite import ablation_report as report
from ropelite import haystack, trainer
from ropelite.attention import Variant, last_rows
from ropelite.data import builtin_documents
from ropelite.errors import RopeliteError
from ropelite.hf import load_model
from ropelite.io import read_jsonl, read_summaries
from ropelite.stats import Interval, entropy, wilson
from ropelite.tokenizer import load_tokenizer

# L = 128: the shortest passkey document of this 800-piece vocabulary (79 tokens) fits in a block
TINY = design.Mini(
    L=128, layers=1, hidden=32, heads=2, ffn=64, vocab=800,
    pretrain=lib.Recipe(length=128, sequences=4, steps=3, lr=1e-3, warmup=1, min_lr_ratio=0.1,
                        mix=lib.Mix(curriculum=8)),
    finetune=lib.Recipe(length=128, sequences=8, steps=2, lr=1e-3, warmup=1, schedule="linear"),
    kinds=("prose",), ppl_multiples=(1, 2), windows_per_kind=3, passkey_lengths=(192, 256), depths=(50,), keys=2)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = builtin_documents("prose")[:40]
    return lib.train_tokenizer(docs, tmp_path_factory.mktemp("tok"), 600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny pipeline, with what each finetune's ``train`` read: model name -> (ids, weights) of every step's
    rows, concatenated in the order they were read."""
    out = tmp_path_factory.mktemp("abl") / "run"
    consumed, real = {}, lib.train

    def train(model, rows, recipe, on_step=None, dtype=torch.float32):
        batches = [rows.batch(s * recipe.sequences, recipe.sequences) for s in range(recipe.steps)]
        consumed[len(consumed)] = (recipe, torch.cat([b[0].flatten() for b in batches]),
                                   torch.cat([b[1].flatten() for b in batches]))
        return real(model, rows, recipe, on_step, dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "train", train)
        pipeline.run_mini(out, TINY)
    names = ["pretrained", *(f.name for f in design.finetunes(TINY))]     # the order the stages ran in
    return out, {name: consumed[i] for i, name in enumerate(names)}


# ----------------------------------------------------------------------------------------------------------------
# Same tokens
# ----------------------------------------------------------------------------------------------------------------

def test_the_8L_finetune_sees_the_same_tokens_in_an_eighth_of_the_rows():
    base = design.Mini().finetune
    short, long = base.at_length(128), base.at_length(1024)
    assert short.tokens == long.tokens == 327_680
    assert (short.sequences, long.sequences) == (16, 2) and short.steps == long.steps
    assert [short.lr_at(s) for s in range(short.steps)] == [long.lr_at(s) for s in range(long.steps)]
    assert (short.seed, short.mix) == (long.seed, long.mix)
    with pytest.raises(RopeliteError, match="do not split"):
        base.at_length(3000)


def test_both_arms_consume_the_same_tokens_in_the_same_order_with_the_same_weights(tiny_run):
    """What ``lib.train`` read in the pipeline, concatenated over every step: for each stream, seed and RoPE the
    L and 8L finetunes read the same tokens with the same weights, in rows of L and of 8L; the answers are
    weighted in the mixed stream and nothing is in the text-only one; another seed reads other tokens."""
    _, consumed = tiny_run
    for ft in design.finetunes(TINY):
        if ft.times == 8:
            continue
        (short, ids, weights) = consumed[ft.name]
        (long, ids8, weights8) = consumed[dataclasses.replace(ft, times=8).name]
        assert (short.length, long.length) == (128, 1024) and short.steps == long.steps
        assert ids.shape == (TINY.finetune.tokens,)
        assert torch.equal(ids, ids8) and torch.equal(weights, weights8)
        assert (weights == 10).any() if ft.stream == "mixed" else (weights == 1).all()
    assert not torch.equal(consumed["ntk-L.mixed1"][1], consumed["ntk-L.mixed2"][1])


def test_the_finetunes_record_one_stream_digest_per_stream_and_seed(tiny_run):
    out, _ = tiny_run
    rows = {r["model"]: r for r in report.token_rows(out, TINY)}
    for ft in design.finetunes(TINY):
        twin = rows[dataclasses.replace(ft, rope="yarn" if ft.rope == "ntk" else "ntk", times=9 - ft.times).name]
        mine = rows[ft.name]
        assert mine["stream_sha256"] == twin["stream_sha256"] and mine["tokens"] == twin["tokens"] == 2 * 8 * 128
        assert (mine["len"], mine["sequences_per_step"]) == ((128, 8) if ft.times == 1 else (1024, 1))
        assert len(read_jsonl(out / "finetunes" / ft.name / "log.jsonl")) == 2
    assert rows["ntk-L.mixed1"]["stream_sha256"] != rows["ntk-L.mixed2"]["stream_sha256"]


def test_the_stream_is_blocks_of_L_with_whole_passkey_documents_and_text_in_order(tok):
    text = lib.token_stream(builtin_documents("prose")[:40], tok, seed=3)
    passkey = lib.PasskeyDocuments(tok, 128)
    mix = lib.Mix(p_passkey=0.5, p_copy=0.0, answer_weight=10.0)
    ids, weights = lib.finetune_stream(text, passkey, 128, mix, seed=3, tokens=128 * 60)
    again = lib.finetune_stream(text, passkey, 128, mix, seed=3, tokens=128 * 60)
    assert np.array_equal(ids, again[0]) and np.array_equal(weights, again[1])
    answer = len(lib.answer_ids(tok, 10_000))
    rest, documents = [], 0
    for block, w in zip(ids.reshape(60, 128), weights.reshape(60, 128)):
        if (w == 10).any():       # a passkey document: at the block's start, whole inside it, its answer weighted
            documents += 1
            end = np.flatnonzero(block == tok.eos_id)[0] + 1
            assert block[0] == tok.bos_id and passkey.shortest <= end <= 128
            assert np.flatnonzero(w == 10).tolist() == list(range(end - 1 - answer, end - 1))
            rest.append(block[end:])
        else:
            assert (w == 1).all()
            rest.append(block)
    assert 15 < documents < 45
    rest = np.concatenate(rest)
    assert np.array_equal(rest, text[:rest.size])             # the text, read in order, between the documents
    plain, ones = lib.finetune_stream(text, passkey, 128, lib.TEXT_ONLY, seed=3, tokens=128 * 60)
    assert np.array_equal(plain, text[:128 * 60]) and (ones == 1).all()
    with pytest.raises(RopeliteError, match="blocks of 128"):
        lib.finetune_stream(text, passkey, 128, mix, seed=3, tokens=1000)


def test_stream_rows_cut_the_stream_in_order():
    ids, weights = np.arange(32), np.linspace(0, 1, 32, dtype=np.float32)
    rows = lib.StreamRows(ids, weights, 4)
    x, w = rows.batch(2, 3)
    assert x.tolist() == [[8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    assert torch.equal(w.flatten(), torch.from_numpy(weights[8:20]))
    assert torch.equal(lib.StreamRows(ids, weights, 16).batch(0, 2)[0].flatten(), rows.batch(0, 8)[0].flatten())
    with pytest.raises(RopeliteError, match="run past"):
        rows.batch(7, 2)
    with pytest.raises(RopeliteError, match="does not cut"):
        lib.StreamRows(ids, weights, 5)


def test_pretraining_schedule_warms_up_then_decays_to_its_floor():
    r = lib.Recipe(length=8, sequences=1, steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert r.lr_at(0) == 0 and r.lr_at(5) == 0.5 and r.lr_at(10) == 1.0
    assert r.lr_at(99) == 0.1 and r.lr_at(55) == pytest.approx(0.5)   # cosine's midpoint, above the floor


# ----------------------------------------------------------------------------------------------------------------
# Pretraining rows
# ----------------------------------------------------------------------------------------------------------------

def test_a_passkey_document_holds_its_key_at_the_depth_and_the_span_covers_the_answer(tok):
    docs = lib.PasskeyDocuments(tok, 512)
    for depth in (0, 50, 100):
        ids, span = docs.document(54321, 400, depth)
        assert len(ids) <= 400 and ids[-1] == tok.eos_id and span.stop == len(ids) - 1
        assert tok.decode(ids[span]) == " 54321." or tok.decode(ids[span]) == "54321."
        assert ids[span] == lib.answer_ids(tok, 54321)
        text = tok.decode(ids[:span.start])
        assert text.endswith("The pass key is") and text.count("54321") == 2
        # the key line sits at the requested depth of the filler (to the sentence boundary before it)
        context = text.split("there.\n", 1)[1].rsplit("\n", 1)[0]
        at = context.index("The pass key is 54321") / len(context)
        assert abs(at - depth / 100) < 0.15


def test_rows_are_pure_functions_of_seed_and_index_with_the_asked_shares(tok):
    stream = lib.token_stream(builtin_documents("prose")[:40], tok)
    rows = lib.MixedRows(stream, lib.PasskeyDocuments(tok, 256), 256, lib.Mix(p_passkey=0.4, p_copy=0.2), seed=3)
    again = lib.MixedRows(stream, lib.PasskeyDocuments(tok, 256), 256, lib.Mix(p_passkey=0.4, p_copy=0.2), seed=3)
    ids, weights = rows.batch(100, 8)
    assert torch.equal(ids, again.batch(100, 8)[0]) and ids.shape == weights.shape == (8, 256)
    kinds = {"passkey": 0, "copy": 0, "text": 0}
    for i in range(300):
        ids, weights = rows.row(i)
        if (weights != 1).any():
            kinds["passkey"] += 1
            assert (weights == 10).sum() == len(lib.answer_ids(tok, 10000)) and ids[0] == tok.bos_id
            assert ids[np.flatnonzero(weights == 10)[-1] + 1] == tok.eos_id   # the answer is followed by EOS
        elif any(np.array_equal(ids[:k], ids[k:2 * k]) for k in range(8, 129)):
            kinds["copy"] += 1
        else:
            kinds["text"] += 1
    assert abs(kinds["passkey"] / 300 - 0.4) < 0.1 and abs(kinds["copy"] / 300 - 0.2) < 0.08


def test_the_curriculum_grows_the_longest_passkey_document(tok):
    stream = np.arange(1000, dtype=np.int32) % 500
    rows = lib.MixedRows(stream, lib.PasskeyDocuments(tok, 256), 256, lib.Mix(curriculum=100, curriculum_start=48), 0)
    shortest = rows.passkey.shortest
    assert rows.longest_passkey(0) == shortest and rows.longest_passkey(100) == 256
    assert shortest < rows.longest_passkey(75) < 256


# ----------------------------------------------------------------------------------------------------------------
# The loss and the training step
# ----------------------------------------------------------------------------------------------------------------

def test_weighted_loss_is_cross_entropy_with_each_target_counted_its_weight(tiny_llama):
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 20))
    weights = torch.ones(2, 20)
    weights[0, 5:9] = 3.0
    weights[1, 2:4] = 0.5
    weights[:, 0] = 7.0                                             # a row's first token is no target
    logits = model(ids)[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1), reduction="none")
    reference = (nll * weights[:, 1:].reshape(-1)).mean()
    reference.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, plain = lib.weighted_nll(model, ids, weights, chunk_size=7)       # sums over the 2 x 19 targets
    (loss / nll.numel()).backward()
    assert float(loss.detach()) / nll.numel() == pytest.approx(float(reference.detach()), rel=1e-5)
    assert float(plain.detach()) == pytest.approx(float(nll.detach().sum()), rel=1e-5)
    for (name, p), g in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7, msg=name)


def one_step_rows(tok, passkey_share: float = 1.0) -> tuple[lib.MixedRows, lib.Recipe]:
    """Rows of passkey documents (their answers weighted x10) and a one-step recipe at the peak lr (no warmup)."""
    stream = lib.token_stream(builtin_documents("prose")[:40], tok)
    mix = lib.Mix(p_passkey=passkey_share, p_copy=0.0, answer_weight=10.0)
    recipe = lib.Recipe(length=128, sequences=4, steps=1, lr=1e-3, warmup=0, mix=mix)
    return lib.MixedRows(stream, lib.PasskeyDocuments(tok, 128), 128, mix, seed=5), recipe


def small_model(tok, seed: int = 0):
    from ropelite.model import Llama, LlamaConfig
    from ropelite.rope import RopeConfig
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                             rope=RopeConfig(theta=1e4, original_max_position_embeddings=128)))


def test_the_finetune_step_is_train_pys_step(tok):
    """One step of the ablation's ``train`` and one of train.py's (trainer.optimizer_step, the plain loss, the
    AdamW train.py makes with the same betas and weight decay) on the same rows from the same weights: with every
    weight 1 the same weights bit for bit; with the answers at 10 the trainer's step given the weighted loss, and
    an AdamW stepped by hand on the weighted cross-entropy of forward()'s logits, clipped at 1."""
    from ropelite.parallel import make_optimizer
    rows, recipe = one_step_rows(tok)
    ids, weights = rows.batch(0, recipe.sequences)
    assert (weights == 10).any()                                     # the weight has answers to act on
    n_predicted = recipe.sequences * (recipe.length - 1)

    def train_py_step(loss_fn=trainer.next_token_nll, batch=(ids,)):
        model = small_model(tok).train()
        optimizer = make_optimizer(model, 2e-5, (0.9, 0.95), 0.0, torch.device("cpu"))    # train.py's defaults
        trainer.optimizer_step(model, optimizer, [batch], recipe.lr_at(0), n_predicted, loss_fn, clip=1.0)
        return model.state_dict()

    class Fixed:                                       # rows whose weights are the given ones
        def __init__(self, w):
            self.w = w

        def batch(self, first, count):
            return ids, self.w

    def ablation_step(w):
        model = small_model(tok)
        lib.train(model, Fixed(w), recipe)
        return model.state_dict()

    plain, trained = train_py_step(), ablation_step(torch.ones_like(weights))
    assert all(torch.equal(plain[k], trained[k]) for k in plain) and not torch.equal(plain["norm.weight"],
                                                                                      small_model(tok).norm.weight)
    weighted = ablation_step(weights)
    shared = train_py_step(lib.weighted_nll, (ids, weights))
    assert all(torch.equal(shared[k], weighted[k]) for k in shared)
    assert not all(torch.equal(plain[k], weighted[k]) for k in plain)   # the weight changes the update

    reference = small_model(tok).train()
    logits = reference(ids)[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, tok.vocab_size), ids[:, 1:].reshape(-1), reduction="none")
    (nll * weights[:, 1:].reshape(-1)).mean().backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    torch.optim.AdamW(reference.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0).step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(weighted[name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_the_dtype_reaches_the_training_autocast_and_the_evaluated_weights(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    name = "ntk-8L.mixed1"
    shutil.rmtree(out / "finetunes" / name)
    (out / "eval" / f"{name}.json").unlink()
    seen, real = [], lib.optimizer_step
    monkeypatch.setattr(lib, "optimizer_step", lambda *a, **k: seen.append(k["dtype"]) or real(*a, **k))
    pipeline.run_task(out, TINY, name, [w for w in held_windows(out)], "bf16", None, False)
    assert seen == [torch.bfloat16] * TINY.finetune.steps
    assert json.loads((out / "eval" / f"{name}.json").read_text())["dtype"] == "torch.bfloat16"
    assert json.loads((out / "eval" / "ntk-L.mixed1.json").read_text())["dtype"] == "torch.float32"


def held_windows(out: Path) -> list[lib.Window]:
    split = lib.split_documents(TINY.kinds)
    tok = load_tokenizer(out / "pretrained")
    return lib.heldout_windows(split.held, tok, max(TINY.lengths), TINY.windows_per_kind)


def test_the_trained_record_has_train_pys_keys(tiny_run, tmp_path):
    """Both trainers write config.json's "trained" block with one function: the same keys, the readers' included
    (len for hf.trained_length, sequences_per_step for token_rows, tokens)."""
    import train
    out = train.main(["--init", "random", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "2",
                      "--len", "32", "--tokens", "128", "--batch-tokens", "64", "--builtin", "prose", "--device",
                      "cpu", "--dtype", "fp32", "--quiet", "--eval-tokens", "0", "--out", str(tmp_path / "run")])
    ours = json.loads((out / "config.json").read_text())["ropelite"]["trained"]
    for folder in ("pretrained", "finetunes/ntk-8L.mixed1"):
        theirs = json.loads((tiny_run[0] / folder / "config.json").read_text())["ropelite"]["trained"]
        assert theirs.keys() == ours.keys() >= {"len", "sequences_per_step", "batch_tokens", "steps", "tokens"}
    assert (ours["len"], ours["sequences_per_step"], ours["batch_tokens"], ours["tokens"]) == (32, 2, 64, 128)
    assert (theirs["len"], theirs["sequences_per_step"], theirs["step"], theirs["init"]) == (1024, 1, 2, "pretrained")
    assert theirs["data"]["mix"]["answer_weight"] == 10.0 and theirs["data"]["stream"] == "mixed"


# ----------------------------------------------------------------------------------------------------------------
# Held out: nothing trained on
# ----------------------------------------------------------------------------------------------------------------

def test_word_runs_and_their_overlap():
    seen = set(lib.word_runs(" ".join(map(str, range(30)))))
    assert len(lib.word_runs("a " * 11)) == 0 and len(lib.word_runs("a " * 13)) == 2
    assert lib.overlap(" ".join(map(str, range(10, 40))), seen) == pytest.approx(9 / 19)   # runs from 10..18
    assert lib.overlap("short text", seen) == 0.0


def test_documents_sharing_word_runs_are_grouped():
    words = [f"w{i}" for i in range(400)]
    base = " ".join(words)
    inside = " ".join(words[100:200])                   # wholly inside base
    other = " ".join(f"x{i}" for i in range(300))
    # 3 of its 289 runs in base: just above 1 % ; 2 of 289: not above
    above = " ".join(words[:14] + [f"y{i}" for i in range(286)])
    below = " ".join(words[:13] + [f"z{i}" for i in range(287)])
    assert lib.overlap_groups([base, other, inside, above, below]) == [[0, 2, 3], [1], [4]]


def test_each_book_is_split_at_a_line_break_it_has():
    split = lib.split_documents(("books",))
    books = dict(zip(["botchan", "alice29", "asyoulik", "lcet10"], builtin_documents("books")))
    assert "\n\n" not in books["botchan"]                       # the book that rfind("\n\n") could not split
    for name, tail in split.held["books"]:
        book = books[name.split("[")[0]]
        cut = int(name.split("[")[1].rstrip(":]"))
        assert book[cut:] == tail and book[cut - 1] == "\n" and 0.05 < len(tail) / len(book) < 0.15
        assert book[:cut] in split.train


@pytest.mark.slow
def test_no_evaluation_window_has_more_than_1_percent_of_its_word_runs_in_the_training_text(tmp_path):
    """The miniature's own split, tokenizer and windows: every window's share of 12-word runs seen verbatim in
    the training text is at most 1 %. (The split that held out every 10th topic let through windows of
    97 %, 75 % and 32 %.)"""
    cfg = design.Mini()
    split = lib.split_documents(cfg.kinds)
    tok = lib.train_tokenizer(split.train, tmp_path, cfg.vocab)
    windows = lib.heldout_windows(split.held, tok, max(cfg.lengths), cfg.windows_per_kind)
    assert [w.kind for w in windows] == ["books"] * 4 + ["prose"] * 4 + ["code"] * 4
    shares = lib.window_overlaps(windows, tok, split.train)
    assert max(shares) <= lib.OVERLAP_LIMIT, [(w.pieces, s) for w, s in zip(windows, shares) if s > lib.OVERLAP_LIMIT]
    held = {name for docs in split.held.values() for name, _ in docs}
    for w in windows:                                           # each window names where its tokens come from
        assert sum(t for _, _, t in w.pieces) <= len(w.ids) - 1 and all(d in held for d, _, _ in w.pieces)


def test_windows_are_sample_windows_of_units_of_at_least_one_window(tok):
    held = {"prose": [("a", "alpha beta " * 50), ("b", "gamma delta " * 10), ("c", "epsilon zeta " * 200)]}
    windows = lib.heldout_windows(held, tok, 65, 3)
    assert all(len(w.ids) == 65 and w.ids[0] == tok.bos_id for w in windows)
    first = tok.encode("alpha beta " * 50, add_bos=False)
    assert windows[0].ids[1:].tolist() == first[:64] and windows[0].pieces == [["a", 0, 64]]
    assert [p[0] for w in windows for p in w.pieces][:2] == ["a", "b"]       # the second unit starts at "b"


# ----------------------------------------------------------------------------------------------------------------
# Evaluation pieces
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_one_forward_gives_every_lengths_perplexities_and_last_query_entropy(tiny_llama):
    model = tiny_llama()
    ids = np.random.default_rng(0).integers(0, 97, 128)
    rows = lib.window_rows(model, ids, [32, 64, 128], L=32)
    for r in rows:
        n = r["length"]
        x = torch.as_tensor(ids[:n]).unsqueeze(0)
        s, count = model.nll(x)
        assert r["nll"] == pytest.approx(float(s) / int(count), rel=1e-5)
        labels = x.clone()
        labels[:, :max(1, n - 32)] = -100
        s, count = model.nll(x, labels)
        assert int(count) == min(n - 1, 32) and r["nll_last_L"] == pytest.approx(float(s) / int(count), rel=1e-5)
        alone = float(entropy(last_rows(Variant("", model, model.config, 0), ids[:n])).mean())
        assert r["last_query_entropy"] == pytest.approx(alone, rel=1e-5)
    assert rows[0]["nll"] == rows[0]["nll_last_L"]


def test_count_models_of_a_cycle():
    vocab, stream = 10, np.tile(np.arange(10, dtype=np.int32), 500)
    (row,) = lib.count_model_nll(stream, vocab, np.tile(np.arange(10), 3), [30])
    assert math.exp(row["unigram"]) == pytest.approx(10, rel=1e-3)     # every token equally frequent
    assert math.exp(row["bigram"]) < 1.01                              # the next token is certain


# ----------------------------------------------------------------------------------------------------------------
# Intervals and verdicts
# ----------------------------------------------------------------------------------------------------------------

def interval(low, high, estimate=None):
    return Interval((low + high) / 2 if estimate is None else estimate, low, high, 30, "bootstrap")


def test_claim_1_holds_only_when_both_intervals_separate_the_claimed_way():
    entropy_metric, rate = lib.METRICS["answer_entropy"], lib.METRICS["passed"]
    low, mid, high = interval(1.0, 2.0), interval(2.5, 3.0), interval(3.5, 4.0)
    assert lib.claim_1(entropy_metric, low, mid, high) == lib.HOLDS
    assert lib.claim_1(entropy_metric, low, mid, interval(1.5, 2.6)) == lib.UNCLEAR     # overlaps the free model
    assert lib.claim_1(entropy_metric, mid, low, high) == lib.FAILS                     # above the L finetune
    assert lib.claim_1(rate, high, mid, low) == lib.HOLDS and lib.claim_1(rate, low, mid, high) == lib.FAILS
    assert lib.claim_1(rate, wilson(2, 2), mid, low) == lib.UNCLEAR                     # no interval below 3 trials


def test_claim_2_reads_the_difference_interval_against_the_margin():
    m, ppl = lib.METRICS["answer_entropy"], lib.METRICS["nll_last_L"]
    assert m.near == 0.25
    assert lib.claim_2(m, interval(-0.2, 0.24)) == lib.HOLDS
    assert lib.claim_2(m, interval(-0.2, 0.3)) == lib.UNCLEAR
    assert lib.claim_2(m, interval(0.26, 0.9)) == lib.FAILS and lib.claim_2(m, interval(-0.9, -0.3)) == lib.FAILS
    assert lib.claim_2(ppl, interval(0.95, 1.05)) == lib.HOLDS and lib.claim_2(ppl, interval(1.12, 1.3)) == lib.FAILS
    assert lib.claim_2(m, Interval(0.0, None, None, 2, "bootstrap")) == lib.UNCLEAR


def test_metric_intervals_pool_the_seeds_and_pair_the_units():
    rate = lib.METRICS["passed"]
    x = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=float)
    assert rate.interval(x) == wilson(6, 12)
    ppl = lib.METRICS["nll_last_L"]
    nll = np.log([[10.0, 20.0, 40.0], [10.0, 20.0, 40.0], [10.0, 20.0, 40.0]])
    assert ppl.interval(nll).estimate == pytest.approx((10 * 20 * 40) ** (1 / 3))
    assert ppl.interval(nll) == ppl.interval(nll)                      # seeded: the same interval again
    diff = ppl.difference(nll + math.log(1.05), nll[0])                # every unit 5 % worse than the reference
    assert (diff.estimate, diff.low, diff.high) == pytest.approx((1.05, 1.05, 1.05))
    spread = lib.METRICS["answer_entropy"].difference(np.array([[1.0, 2.0, 3.0]] * 3), np.array([1.0, 2.0, 3.0]))
    assert (spread.low, spread.high) == (0.0, 0.0)                     # paired: the units' spread cancels


def stats_for(values: dict[tuple[str, str], list[float]], metric: str = "answer_entropy") -> list[dict]:
    """Statistics rows with the given estimates per (arm, stream) at lengths 64, 128, 256 (L = 64), intervals
    +-0.1 around them."""
    rows = []
    for (arm, stream), estimates in values.items():
        for n, v in zip((64, 128, 256), estimates):
            rows.append({"arm": arm, "stream": stream, "metric": metric, "length": n, "value": v,
                         "value_low": v - 0.1, "value_high": v + 0.1, "value_n": 30})
    return rows


def test_every_length_where_8L_goes_against_the_claim_is_named():
    cfg = dataclasses.replace(TINY, L=64, passkey_lengths=(64, 128, 256))
    at = report.stat_index(stats_for({("ntk-8L", "mixed"): [3.0, 2.0, 5.0], ("ntk-L", "mixed"): [2.5, 3.0, 4.5]}))
    flips = report.against_claim(cfg, at, "ntk", "mixed", lib.METRICS["answer_entropy"])
    assert flips == ["64 (3.00 vs 2.50)", "256 (5.00 vs 4.50)"]


def test_the_retrieval_line_says_where_8L_loses_inside_L_and_L_wins_at_2L():
    cfg = dataclasses.replace(TINY, L=64, passkey_lengths=(48, 64, 128, 256))
    rows = []
    for arm, passed in (("ntk-8L", {48: 28, 64: 2, 128: 3, 256: 0}), ("ntk-L", {48: 29, 64: 27, 128: 20, 256: 0})):
        for n, k in passed.items():
            rows.append({"arm": arm, "stream": "mixed", "metric": "passed", "length": n,
                         **wilson(k, 30).fields("value"), "passed": k, "trials": 30})
    (line,) = report.retrieval_lines(cfg, report.stat_index(rows), "ntk", "mixed", "NTK")
    assert "the 8L finetune loses retrieval inside L at 64" in line and "48" not in line.split("So")[1]
    assert "the L finetune wins at 2L" in line and "128: 8L 0.10 [0.03, 0.26] vs L 0.67" in line


# ----------------------------------------------------------------------------------------------------------------
# The pipeline: outputs, resume
# ----------------------------------------------------------------------------------------------------------------

def test_the_pipeline_writes_every_model_and_result(tiny_run):
    out, _ = tiny_run
    stats = json.loads((out / "ablation.json").read_text())
    assert {r["arm"] for r in stats} == {"rope", "ntk-free", "ntk-L", "ntk-8L", "yarn-free", "yarn-L", "yarn-8L"}
    assert {(r["arm"], r["stream"]) for r in stats if r["arm"] == "ntk-8L"} == {("ntk-8L", "mixed"), ("ntk-8L", "text")}
    row = next(r for r in stats
               if (r["arm"], r["stream"], r["metric"], r["length"]) == ("ntk-8L", "mixed", "passed", 256))
    assert (row["trials"], row["seeds"], len(row["per_seed"])) == (3 * 2, 3, 3)        # 3 seeds x 1 depth x 2 keys
    model = load_model(out / "finetunes" / "ntk-8L.mixed2")
    assert model.config.rope.type == "ntk" and model.config.rope.factor == 8
    for png in ("heatmap_ntk.png", "heatmap_yarn_text.png", "ppl.png", "ppl_last_L.png", "last_query_entropy.png",
                "passkey_entropy.png", "pass_rate.png"):
        assert (out / png).stat().st_size > 1000
    windows = json.loads((out / "windows.json").read_text())
    assert len(windows) == 3 and all(w["overlap"] <= 0.01 and w["pieces"] for w in windows)
    (summary,) = read_summaries(out)
    assert summary["results"] == "ablation" and summary["claim"].count("§4.3") == 1
    assert not any("§4.3" in line for line in summary["finding"])
    verdicts = summary["numbers"]["verdicts"]
    assert {(v["rope"], v["stream"], v["metric"], v["length"]) for v in verdicts} == {
        (r, s, m, n) for r in ("ntk", "yarn") for s in ("mixed", "text")
        for m in ("answer_entropy", "passed", "nll_last_L", "last_query_entropy") for n in (256,)}
    assert all(v["claim_1"] in (lib.HOLDS, lib.FAILS, lib.UNCLEAR) for v in verdicts)
    assert summary["finding"][0].startswith("NTK x8, mixed stream (3 finetune seeds), passkey answer entropy (nats), "
                                            "8L / L finetune / training-free (n = 6 / 6 / 2): 256: ")
    cells = [json.loads((out / "passkey" / f"ntk-8L.mixed{s}" / "passkey.json").read_text())[1] for s in (1, 2, 3)]
    entropy_8L = next(v for v in verdicts
                      if (v["rope"], v["stream"], v["metric"]) == ("ntk", "mixed", "answer_entropy"))
    assert entropy_8L["8L"] == pytest.approx(np.mean([h for c in cells for h in c["entropy_trials"]]))
    section = (out / "section.md").read_text()
    assert "**Sanity checks**" in section and "Verdicts, text stream" in section and "claim 2" in section


def test_a_stage_folder_appears_whole_or_not_at_all(tmp_path):
    folder = tmp_path / "stage"
    with pytest.raises(RuntimeError):
        with pipeline.stage_folder(folder) as tmp:
            (tmp / "half.txt").write_text("written before the stage failed")
            raise RuntimeError
    assert not folder.exists() and (tmp_path / ".stage.tmp" / "half.txt").is_file()
    with pipeline.stage_folder(folder) as tmp:                      # the rerun starts from an empty folder
        assert list(tmp.iterdir()) == []
        (tmp / "done.txt").write_text("whole")
    assert [p.name for p in folder.iterdir()] == ["done.txt"] and not (tmp_path / ".stage.tmp").exists()


def test_a_grown_passkey_grid_runs_only_its_new_cells_and_resumes_after_a_kill(tiny_run, tmp_path, count_calls):
    wider = dataclasses.replace(TINY, depths=(50, 90))
    names = design.model_names(TINY)
    before = {n: json.loads((tiny_run[0] / "passkey" / n / "passkey.json").read_text()) for n in names}
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    calls = count_calls(pipeline, "passkey_cell")
    calls.kill_at = 3                              # the third model's new cell
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_mini(out, wider)
    calls.clear()
    calls.kill_at = 0
    pipeline.run_mini(out, wider)
    assert len(calls) == 2 * len(names) - 2        # the two new cells finished before the kill are kept
    for name, old in before.items():
        rows = json.loads((out / "passkey" / name / "passkey.json").read_text())
        assert [(r["length"], r["depth"]) for r in rows] == [(192, 50), (256, 50), (192, 90), (256, 90)]
        assert rows[:2] == old


def test_a_rerun_skips_finished_stages_and_an_interrupted_one_redoes_only_its_own(tiny_run, tmp_path, capfd):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    before = (out / "ablation.json").read_text()
    folders = [out / "pretrained", *(out / "finetunes" / f.name for f in design.finetunes(TINY))]
    weights = {f: (f / "model.safetensors").stat().st_mtime_ns for f in folders}
    pipeline.run_mini(out, TINY)                                        # everything done: nothing retrained
    assert "pretrained: " in capfd.readouterr().err
    assert {f: (f / "model.safetensors").stat().st_mtime_ns for f in folders} == weights
    assert (out / "ablation.json").read_text() == before
    # a run killed inside the yarn-8L finetune leaves its temporary folder and no results for it
    shutil.rmtree(out / "finetunes" / "yarn-8L.mixed2")
    (out / "finetunes" / ".yarn-8L.mixed2.tmp").mkdir()
    (out / "eval" / "yarn-8L.mixed2.json").unlink()
    shutil.rmtree(out / "passkey" / "yarn-8L.mixed2")
    pipeline.run_mini(out, TINY)
    assert (out / "pretrained" / "model.safetensors").stat().st_mtime_ns == weights[out / "pretrained"]
    assert not (out / "finetunes" / ".yarn-8L.mixed2.tmp").exists()
    assert (out / "ablation.json").read_text() == before               # deterministic: the same numbers again


@pytest.mark.slow
def test_two_worker_processes_give_the_numbers_of_one(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    before = (out / "ablation.json").read_text()
    for name in ("ntk-L.mixed3", "yarn-8L.text1"):
        shutil.rmtree(out / "finetunes" / name)
        (out / "eval" / f"{name}.json").unlink()
        shutil.rmtree(out / "passkey" / name)
    pipeline.run_mini(out, TINY, workers=2, threads=1)
    assert (out / "ablation.json").read_text() == before


def test_main_prints_the_section_and_the_measured_finding(tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    real = ablation.run_mini
    monkeypatch.setattr(ablation, "run_mini", lambda folder, **kw: real(folder, TINY, **kw))
    ablation.main(["--out", str(out), "--threads", "1"])
    printed = capsys.readouterr().out
    (summary,) = read_summaries(out)
    assert "**Sanity checks**" in printed and "finding:\n" + "\n".join(summary["finding"]) + "\n" in printed


def test_each_heatmap_panel_draws_its_own_training_length(tiny_run, monkeypatch):
    out, _ = tiny_run
    figures = []
    monkeypatch.setattr(haystack, "save_figure", lambda fig, path: figures.append(fig))
    monkeypatch.setattr(report, "save_figure", lambda fig, path: None)       # the shared run's figures stay
    monkeypatch.setattr(report, "draw_heatmaps", lambda panels, *a, **k: figures.append(panels))
    report.draw_all(out, TINY, json.loads((out / "ablation.json").read_text()))
    panels = figures[0]
    assert [p[2] for p in panels] == [128, 128, 128, 1024]            # pretrained, free, L, 8L
    assert [c["trials"] for c in panels[3][1]] == [3 * 2, 3 * 2]      # the 3 seeds' trials pooled
    lengths = [64, 128, 256, 512, 1024, 2048]
    figures.clear()
    haystack.draw_heatmaps([(t, [{**r, "length": n} for r in rows for n in lengths], L) for t, rows, L in panels],
                           lengths, [50], Path("unused.png"))
    dashed = [[line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"] for ax in figures[0].axes[:4]]
    assert dashed == [[1.5], [1.5], [1.5], [4.5]]   # between 128 and 256 for L; between 1024 and 2048 for 8L


def test_bad_flags_are_one_line_errors():
    for argv, message in ((["--workers", "0"], "--workers must be at least 1"),
                          (["--threads", "0"], "--threads must be at least 1"),
                          (["--scale", "mini", "--dry-run"], "--dry-run is for --scale paper")):
        with pytest.raises(RopeliteError, match=message):
            ablation.main(argv)


def test_paper_scale_commands_parse_with_the_scripts_own_parsers(tmp_path):
    import eval_ppl
    import needle
    import train
    args = ablation.parse_args(["--scale", "paper", "--dry-run", "--device", "cuda", "--out", str(tmp_path)])
    commands = ablation.paper_commands(args)
    scripts = [c[0] for c in commands]
    assert scripts.count("train.py") == 4 and scripts.count("eval_ppl.py") == 7 and scripts.count("needle.py") == 14
    lengths = []
    for argv in commands:
        if argv[0] == "train.py":
            parsed = train.parse_args(argv[1:])
            lengths.append(parsed.len)
            assert parsed.tokens == 20971520 and parsed.batch_tokens == 262144
        elif argv[0] == "needle.py":
            needle.check_args(needle.parse_args(argv[1:]))
        else:
            eval_ppl.parse_args(argv[1:])
    assert sorted(lengths) == [8192, 8192, 32768, 32768]


def test_paper_runs_the_ablation_piece_and_quotes_its_finding(tiny_run, tmp_path):
    import paper
    out, _ = tiny_run
    for scale, expected in (("mini", ["ablation.py", "--scale", "mini", "--out", str(tmp_path / "ablation")]),
                            ("paper", ["ablation.py", "--scale", "paper", "--model", "smollm2", "--device", "cuda",
                                       "--out", str(tmp_path / "ablation")])):
        args = paper.argparse.Namespace(model="smollm2", device="cuda" if scale == "paper" else "cpu", scale=scale,
                                        only=["ablation"], out=str(tmp_path))
        (step,) = paper.plan(args)
        assert step["argv"] == expected
    step = {"key": "ablation", "title": "t", "argv": ["ablation.py", "--out", str(out)]}
    lines = paper.summary([step])
    (summary,) = read_summaries(out)
    assert lines[0] == f"### {summary['title']}" and all(f"- {line}" in lines for line in summary["finding"])
    section = paper.piece_section(out.parent, step, {"code": 0, "seconds": 1.0})
    assert "**Sanity checks**" in section and "![heatmap_ntk.png](run/heatmap_ntk.png)" in section


def test_window_rows_wants_increasing_lengths(tiny_llama):
    with pytest.raises(RopeliteError, match="increasing order"):
        lib.window_rows(tiny_llama(), np.arange(64) % 97, [64, 32], L=32)


def test_main_resolves_auto_and_gives_each_worker_its_share_of_the_cores(tmp_path, monkeypatch):
    from ropelite.cli import resolve_dtype
    seen = {}
    monkeypatch.setattr(ablation, "run_mini", lambda folder, **kw: seen.update(kw) or [])
    monkeypatch.setattr(ablation.torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(ablation.torch, "set_num_threads", lambda n: None)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "section.md").write_text("")
    ablation.main(["--out", str(tmp_path / "run"), "--workers", "2"])
    assert seen == {"workers": 2, "threads": 2, "dtype": resolve_dtype("auto", "cpu")}
    ablation.main(["--out", str(tmp_path / "run"), "--workers", "2", "--threads", "1", "--dtype", "fp32"])
    assert seen == {"workers": 2, "threads": 1, "dtype": "fp32"}
