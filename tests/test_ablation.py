"""The ablation miniature (ablation.py, ropelite/ablation.py): equal token budgets at L and 8L, the rows of the
training mix, the weighted loss against plain cross-entropy, its training step being train.py's own, the
"trained" record having train.py's keys, each heatmap panel's own dashed line, resume of the whole pipeline (a
tiny configuration of a few seconds), and the paper-scale commands."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ablation
from ropelite import ablation as lib
from ropelite import haystack, trainer
from ropelite.data import builtin_documents
from ropelite.errors import RopeliteError
from ropelite.io import read_jsonl, read_summaries

TINY = ablation.Mini(
    L=64, layers=1, hidden=32, heads=2, ffn=64, vocab=400,
    pretrain=lib.Recipe(length=64, sequences=4, steps=3, lr=1e-3, warmup=1, min_lr_ratio=0.1, mix=lib.Mix(curriculum=8)),
    finetune=lib.Recipe(length=64, sequences=8, steps=2, lr=1e-3, warmup=1, schedule="linear", seed=1),
    kinds=("prose",), ppl_multiples=(1, 2), docs_per_kind=2, passkey_lengths=(192,), depths=(50,), trials=1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = builtin_documents("prose")[:40]
    return lib.train_tokenizer(docs, tmp_path_factory.mktemp("tok"), 600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("abl") / "run"
    ablation.run_mini(out, TINY)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Token budgets
# ----------------------------------------------------------------------------------------------------------------

def test_the_8L_finetune_sees_the_same_tokens_in_an_eighth_of_the_rows():
    base = ablation.Mini().finetune
    short, long = base.at_length(128), base.at_length(1024)
    assert short.tokens == long.tokens == 327_680
    assert (short.sequences, long.sequences) == (16, 2) and short.steps == long.steps
    assert [short.lr_at(s) for s in range(short.steps)] == [long.lr_at(s) for s in range(long.steps)]
    assert (short.seed, short.mix) == (long.seed, long.mix)
    with pytest.raises(RopeliteError, match="do not split"):
        base.at_length(3000)


def test_the_trained_folders_record_equal_budgets(tiny_run):
    rows = {r["model"]: r for r in ablation.token_rows(tiny_run)}
    for rope in ("ntk", "yarn"):
        short, long = rows[f"{rope}-L"], rows[f"{rope}-8L"]
        assert short["tokens"] == long["tokens"] == 2 * 8 * 64
        assert (short["len"], long["len"]) == (64, 512) and (short["sequences_per_step"], long["sequences_per_step"]) == (8, 1)
        assert len(read_jsonl(tiny_run / f"{rope}-8L" / "log.jsonl")) == short["steps"] == long["steps"]


def test_pretraining_schedule_warms_up_then_decays_to_its_floor():
    r = lib.Recipe(length=8, sequences=1, steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert r.lr_at(0) == 0 and r.lr_at(5) == 0.5 and r.lr_at(10) == 1.0
    assert r.lr_at(99) == 0.1 and r.lr_at(55) == pytest.approx(0.5)   # cosine's midpoint, above the floor


# ----------------------------------------------------------------------------------------------------------------
# The rows of the training mix
# ----------------------------------------------------------------------------------------------------------------

def test_a_passkey_document_holds_its_key_at_the_depth_and_the_mask_covers_the_answer(tok):
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
    ids, answer = rows.batch(100, 8)
    assert torch.equal(ids, again.batch(100, 8)[0]) and ids.shape == answer.shape == (8, 256)
    kinds = {"passkey": 0, "copy": 0, "text": 0}
    for i in range(300):
        ids, answer = rows.row(i)
        if answer.any():
            kinds["passkey"] += 1
            assert answer.sum() == len(lib.answer_ids(tok, 10000)) and ids[0] == tok.bos_id
            assert ids[np.flatnonzero(answer)[-1] + 1] == tok.eos_id   # the answer is followed by EOS
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


def test_weighted_loss_is_cross_entropy_with_the_answer_counted_w_times(tiny_llama):
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 20))
    answer = torch.zeros(2, 20, dtype=torch.bool)
    answer[0, 5:9] = True
    logits = model(ids)[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1), reduction="none")
    weights = 1 + 2.0 * answer[:, 1:].reshape(-1).float()
    reference = (nll * weights).mean()
    reference.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, plain = lib.weighted_nll(model, ids, answer, 3.0, chunk_size=7)       # sums over the 2 x 19 targets
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
    AdamW train.py makes with the same betas and weight decay) on the same rows from the same weights: at answer
    weight 1 the same weights bit for bit; at weight 10 the trainer's step given the weighted loss, and an AdamW
    stepped by hand on the weighted cross-entropy of forward()'s logits, clipped at 1."""
    import dataclasses
    import functools
    from ropelite.parallel import make_optimizer
    rows, recipe = one_step_rows(tok)
    ids, answer = rows.batch(0, recipe.sequences)
    assert answer.any()                                       # the weight has answers to act on
    n_predicted = recipe.sequences * (recipe.length - 1)

    def train_py_step(loss_fn=trainer.next_token_nll, batch=(ids,)):
        model = small_model(tok).train()
        optimizer = make_optimizer(model, 2e-5, (0.9, 0.95), 0.0, torch.device("cpu"))    # train.py's defaults
        trainer.optimizer_step(model, optimizer, [batch], recipe.lr_at(0), n_predicted, loss_fn, clip=1.0)
        return model.state_dict()

    def ablation_step(weight):
        model = small_model(tok)
        lib.train(model, rows, dataclasses.replace(recipe, mix=dataclasses.replace(recipe.mix, answer_weight=weight)))
        return model.state_dict()

    plain, trained = train_py_step(), ablation_step(1.0)
    assert all(torch.equal(plain[k], trained[k]) for k in plain) and not torch.equal(plain["norm.weight"],
                                                                                      small_model(tok).norm.weight)
    weighted = ablation_step(10.0)
    shared = train_py_step(functools.partial(lib.weighted_nll, weight=10.0), (ids, answer))
    assert all(torch.equal(shared[k], weighted[k]) for k in shared)
    assert not all(torch.equal(plain[k], weighted[k]) for k in plain)   # the weight changes the update

    reference = small_model(tok).train()
    logits = reference(ids)[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, tok.vocab_size), ids[:, 1:].reshape(-1), reduction="none")
    (nll * (1 + 9.0 * answer[:, 1:].reshape(-1).float())).mean().backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    torch.optim.AdamW(reference.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0).step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(weighted[name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_the_trained_record_has_train_pys_keys(tiny_run, tmp_path):
    """Both trainers write config.json's "trained" block with one function: the same keys, the readers' included
    (len for hf.trained_length, sequences_per_step for token_rows, tokens)."""
    import train
    out = train.main(["--init", "random", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "2",
                      "--len", "32", "--tokens", "128", "--batch-tokens", "64", "--builtin", "prose", "--device",
                      "cpu", "--dtype", "fp32", "--quiet", "--eval-tokens", "0", "--out", str(tmp_path / "run")])
    ours = json.loads((out / "config.json").read_text())["ropelite"]["trained"]
    for name in ("pretrained", "ntk-8L"):
        theirs = json.loads((tiny_run / name / "config.json").read_text())["ropelite"]["trained"]
        assert theirs.keys() == ours.keys() >= {"len", "sequences_per_step", "batch_tokens", "steps", "tokens"}
    assert (ours["len"], ours["sequences_per_step"], ours["batch_tokens"], ours["tokens"]) == (32, 2, 64, 128)
    assert (theirs["len"], theirs["sequences_per_step"], theirs["step"], theirs["init"]) == (512, 1, 2, "pretrained")
    assert theirs["data"]["mix"]["answer_weight"] == 10.0 and theirs["min_lr_ratio"] == 0.0


def test_heldout_and_training_text_do_not_overlap():
    train, held = lib.split_documents(("prose",))
    assert len(held["prose"]) == 8 and not set(train) & set(held["prose"])


# ----------------------------------------------------------------------------------------------------------------
# Evaluation pieces
# ----------------------------------------------------------------------------------------------------------------

def test_tail_perplexity_of_the_whole_window_is_the_truncate_protocol(tiny_llama):
    model = tiny_llama()
    docs = [np.random.default_rng(i).integers(0, 97, 40) for i in range(2)]
    assert lib.tail_perplexity(model, docs, 40, 40) == pytest.approx(lib.perplexity(model, docs, 40)["ppl"], rel=1e-6)


def test_count_models_of_a_cycle():
    vocab, stream = 10, np.tile(np.arange(10, dtype=np.int32), 500)
    (row,) = lib.count_model_rows(stream, vocab, [np.tile(np.arange(10), 3)], [30])
    assert row["unigram_ppl"] == pytest.approx(10, rel=1e-3)      # every token equally frequent
    assert row["bigram_ppl"] < 1.01                               # the next token is certain


def test_each_heatmap_panel_draws_its_own_training_length(tiny_run, monkeypatch):
    panels = ablation.heatmap_panels(tiny_run, ["rope", "ntk-free", "ntk-L", "ntk-8L"])
    assert [p[2] for p in panels] == [64, 64, 64, 512]
    figures = []
    monkeypatch.setattr(haystack, "save_figure", lambda fig, path: figures.append(fig))
    lengths = [32, 64, 128, 256, 512, 1024]
    haystack.draw_heatmaps([(t, [{**r, "length": n} for r in rows for n in lengths], L) for t, rows, L in panels],
                           lengths, [50], Path("unused.png"))
    dashed = [[line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"] for ax in figures[0].axes[:4]]
    assert dashed == [[1.5], [1.5], [1.5], [4.5]]   # between 64 and 128 for L = 64; between 512 and 1024 for 8L


# ----------------------------------------------------------------------------------------------------------------
# The pipeline: outputs, resume
# ----------------------------------------------------------------------------------------------------------------

def test_the_pipeline_writes_every_model_and_result(tiny_run):
    results = json.loads((tiny_run / "ablation.json").read_text())
    assert {r["model"] for r in results} == set(ablation.MODELS)
    assert {r["length"] for r in results} == {64, 128}
    for name in ["pretrained", *ablation.FINETUNES]:
        assert (tiny_run / name / "config.json").is_file() and (tiny_run / name / "tokenizer.model").is_file()
    model = ablation.load_model(tiny_run / "ntk-8L")
    assert model.config.rope.type == "ntk" and model.config.rope.factor == 8
    for png in ("heatmap_ntk.png", "heatmap_yarn.png", "ppl.png", "ppl_last_L.png", "last_query_entropy.png"):
        assert (tiny_run / png).stat().st_size > 1000
    (summary,) = read_summaries(tiny_run)
    assert summary["results"] == "ablation" and "Zhong" in summary["claim"]
    assert summary["finding"][0].startswith("NTK x8, 8L / L finetune / training-free, past 2L = 128 (192): mean "
                                            "answer entropy ")
    cells = json.loads((tiny_run / "passkey" / "ntk-8L" / "passkey.json").read_text())
    assert summary["numbers"]["ntk"]["ntk-8L"]["entropy"] == pytest.approx(cells[0]["entropy"])
    assert summary["numbers"]["sanity"]["ppl_at_L"] > 1


def passkey_rows(entropy: dict, passed: dict, trials: int = 10) -> list[dict]:
    return [{"length": n, "trials": trials, "pass_rate": passed[n] / trials, "entropy": entropy[n]} for n in entropy]


def test_the_finding_pools_past_2L_and_names_every_length_that_goes_the_other_way():
    # L = 64: lengths past 2L are 256 and 512; 8L has the lower entropy at 256 only, the higher pass rate at both
    passkey = {"ntk-8L": passkey_rows({128: 9.0, 256: 2.0, 512: 5.0}, {128: 0, 256: 9, 512: 8}),
               "ntk-L": passkey_rows({128: 1.0, 256: 4.0, 512: 4.5}, {128: 9, 256: 1, 512: 0}),
               "ntk-free": passkey_rows({128: 1.0, 256: 4.0, 512: 4.0}, {128: 9, 256: 0, 512: 0})}
    passkey.update({n.replace("ntk", "yarn"): rows for n, rows in passkey.items()})
    results = {n: {"docs": 3, "rows": [{"length": 1024, "ppl_last_L": 10.0}]} for n in passkey}
    lines, numbers = ablation.finding(results, passkey, 64)
    assert lines[0] == ("NTK x8, 8L / L finetune / training-free, past 2L = 128 (256, 512): mean answer entropy "
                        "3.500 / 4.250 / 4.000 nats (n = 20 trials each); the 8L finetune's is lower than the L "
                        "finetune's, except at 512 (5.000 vs 4.500).")
    assert lines[1] == ("NTK x8, 8L / L finetune / training-free, past 2L = 128 (256, 512): passkey pass rate "
                        "17/20 0.85 [0.64, 0.95] (n=20) / 1/20 0.05 [0.01, 0.24] (n=20) / 0/20 0.00 [0.00, 0.16] "
                        "(n=20); the 8L finetune's is higher than the L finetune's at every length; their "
                        "intervals separate.")
    assert lines[2].endswith("perplexity of the last L tokens at 1024 10.0 / 10.0 / 10.0 (n = 3 documents).")
    assert numbers["ntk"]["ntk-8L"]["passed"] == 17 and numbers["ntk"]["ntk-L"]["pass_rate_high"] < 0.64


def test_a_grown_passkey_grid_runs_only_its_new_cells_and_resumes_after_a_kill(tiny_run, tmp_path, count_calls):
    wider = dataclasses.replace(TINY, depths=(50, 90))
    before = {n: json.loads((tiny_run / "passkey" / n / "passkey.json").read_text()) for n in ablation.MODELS}
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    calls = count_calls(ablation, "passkey_cell")
    calls.kill_at = 3                              # the third model's new cell
    with pytest.raises(KeyboardInterrupt):
        ablation.run_mini(out, wider)
    calls.clear()
    calls.kill_at = 0
    ablation.run_mini(out, wider)
    assert len(calls) == 5                         # the two new cells finished before the kill are kept
    for name, old in before.items():
        rows = json.loads((out / "passkey" / name / "passkey.json").read_text())
        assert [(r["length"], r["depth"]) for r in rows] == [(192, 50), (192, 90)] and rows[0] == old[0]


def test_a_rerun_skips_finished_stages_and_an_interrupted_one_redoes_only_its_own(tiny_run, capfd):
    before = (tiny_run / "ablation.json").read_text()
    weights = {n: (tiny_run / n / "model.safetensors").stat().st_mtime_ns for n in ["pretrained", *ablation.FINETUNES]}
    ablation.run_mini(tiny_run, TINY)                                   # everything done: nothing retrained
    assert "pretrained: " in capfd.readouterr().err
    assert {n: (tiny_run / n / "model.safetensors").stat().st_mtime_ns for n in weights} == weights
    assert (tiny_run / "ablation.json").read_text() == before
    # a run killed inside the yarn-8L finetune leaves its temporary folder and no results for it
    shutil.rmtree(tiny_run / "yarn-8L")
    (tiny_run / ".yarn-8L.tmp").mkdir()
    (tiny_run / "eval" / "yarn-8L.json").unlink()
    shutil.rmtree(tiny_run / "passkey" / "yarn-8L")
    ablation.run_mini(tiny_run, TINY)
    assert (tiny_run / "pretrained" / "model.safetensors").stat().st_mtime_ns == weights["pretrained"]
    assert not (tiny_run / ".yarn-8L.tmp").exists()
    assert (tiny_run / "ablation.json").read_text() == before          # deterministic: the same numbers again


def test_main_prints_the_section_and_the_measured_finding(tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    real = ablation.run_mini
    monkeypatch.setattr(ablation, "run_mini", lambda folder: real(folder, TINY))
    ablation.main(["--out", str(out), "--threads", "1"])
    printed = capsys.readouterr().out
    (summary,) = read_summaries(out)
    assert "**Sanity checks**" in printed and "finding:\n" + "\n".join(summary["finding"]) + "\n" in printed


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
    with pytest.raises(RopeliteError, match="--dry-run is for --scale paper"):
        ablation.main(["--scale", "mini", "--dry-run"])


def test_paper_runs_the_ablation_piece_and_quotes_its_finding(tiny_run, tmp_path):
    import paper
    for scale, expected in (("mini", ["ablation.py", "--scale", "mini", "--out", str(tmp_path / "ablation")]),
                            ("paper", ["ablation.py", "--scale", "paper", "--model", "smollm2", "--device", "cuda",
                                       "--out", str(tmp_path / "ablation")])):
        args = paper.argparse.Namespace(model="smollm2", device="cuda" if scale == "paper" else "cpu", scale=scale,
                                        only=["ablation"], out=str(tmp_path))
        (step,) = paper.plan(args)
        assert step["argv"] == expected
    step = {"key": "ablation", "title": "t", "argv": ["ablation.py", "--out", str(tiny_run)]}
    lines = paper.summary([step])
    (summary,) = read_summaries(tiny_run)
    assert lines[0] == f"### {summary['title']}" and all(f"- {line}" in lines for line in summary["finding"])
    section = paper.piece_section(tiny_run.parent, step, {"code": 0, "seconds": 1.0})
    assert "**Sanity checks**" in section and "![heatmap_ntk.png](run/heatmap_ntk.png)" in section
