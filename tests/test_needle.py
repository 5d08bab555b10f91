"""needle.py, both tasks: what each row records (corpus, pieces, chat, keys, training length, the cell's entropy
from the model the flags chose), the summary of the run's grid, resume after a completed and a killed run,
one-line errors. (The cells, placement, scoring and the grid's findings are tested in test_haystack.py, the grid
grammar in test_cli.py, the entropy meter in test_attention.py.)

The model is a tiny random LLaMa with a byte-level tokenizer (one token per ASCII character).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_haystack import SENTENCES, VOCAB, write_byte_tokenizer

import needle
from ropelite import books, haystack
from ropelite.cli import run_script
from ropelite.haystack import passkeys
from ropelite.hf import config_to_hf, save_model
from ropelite.tokenizer import load_tokenizer

# The built-in books stand-in: needle.py's default haystack without a download (ropelite.books is tested in
# test_books.py). "tiny" is too short for any context here, so the sample rule must pick "long".
BOOKS = [("tiny", "Too short. "), ("long", " ".join(SENTENCES * 60))]


@pytest.fixture(autouse=True)
def books_stand_in(monkeypatch):
    monkeypatch.setattr(books, "documents", lambda: BOOKS)


@pytest.fixture
def model_dir(tmp_path, tiny_llama):
    """make(zero_q=False) -> a saved tiny model with the byte tokenizer; zero_q makes every attention uniform."""
    def make(zero_q: bool = False) -> Path:
        model = tiny_llama(vocab_size=VOCAB, eos_token_id=VOCAB - 1)
        if zero_q:
            with torch.no_grad():
                for block in model.layers:
                    block.self_attn.q_proj.weight.zero_()
        path = tmp_path / ("zero_q" if zero_q else "model")
        save_model(model, path)
        write_byte_tokenizer(path)
        return path
    return make


# ---------------------------------------------------------------------------------------------------------------
# The script: outputs, hand entropy per cell, resume, errors
# ---------------------------------------------------------------------------------------------------------------

def read(out: Path, task: str = "needle") -> list[dict]:
    return json.loads((out / f"{task}.json").read_text())


def test_cell_entropy_is_the_hand_value(model_dir, tmp_path):
    out = tmp_path / "out"
    needle.main(["--model", str(model_dir(zero_q=True)), "--rope", "yarn", "--factor", "4",
                 "--lengths", "500", "--depths", "50", "--max-new-tokens", "5", "--out", str(out)])
    (row,) = read(out)
    hand = sum(math.log(row["tokens"] + j) for j in range(row["generated"])) / row["generated"]
    assert row["entropy"] == pytest.approx(hand, rel=1e-6)
    assert row["entropy_per_layer"] == pytest.approx([hand] * 2, rel=1e-6)
    assert row["rope"] == "yarn x4" and row["tokens"] + 5 <= 500
    # the default haystack: the built-in books, by the sample rule the first one long enough, from its start
    assert row["corpus"] == "books" and row["haystack"] == [["long", 0, row["context_tokens"]]]
    assert row["chat"] is True and row["train_len"] == 64 and row["pass_rate"] in (0.0, 1.0)


def test_passkey_rows(model_dir, tmp_path):
    out = tmp_path / "out"
    needle.main(["--model", str(model_dir(zero_q=True)), "--task", "passkey", "--trials", "3", "--seed", "7",
                 "--no-chat", "--lengths", "500", "--depths", "50", "--max-new-tokens", "4", "--out", str(out)])
    (row,) = read(out, "passkey")
    assert row["keys"] == passkeys(7, 500, 50, 3) and row["trials"] == 3 and len(row["answers"]) == 3
    assert all(n + 4 <= 500 and 1 <= g <= 4 for n, g in zip(row["tokens"], row["generated"]))  # --max-new-tokens
    hands = [sum(math.log(n + j) for j in range(g)) / g for n, g in zip(row["tokens"], row["generated"])]
    assert row["entropy"] == pytest.approx(sum(hands) / 3, rel=1e-6)
    assert row["chat"] is False and row["corpus"] == "filler" and row["haystack"][0][:2] == ["filler", 0]
    (png,) = out.glob("passkey_rope_*.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_summary_is_this_runs_grid(model_dir, tmp_path, monkeypatch):
    """TASK_summary.json: the headline of the grid just run (not of other settings' rows in the same --out),
    beside the claim, with the numbers haystack.grid_findings makes of these very rows."""
    out, path = tmp_path / "out", str(model_dir())
    argv = ["--model", path, "--task", "passkey", "--trials", "2", "--no-chat", "--depths", "0", "100",
            "--max-new-tokens", "3", "--out", str(out)]
    needle.main(argv + ["--lengths", "450"])
    one = load_tokenizer(path).encode(" 1", add_bos=False)  # the second grid answers 1, never a key, at entropy 2
    monkeypatch.setattr(haystack, "answer_with_entropy", lambda *a: (one, [1.0, 3.0]))
    needle.main(argv + ["--lengths", "600", "--seed", "1"])
    summary = json.loads((out / "passkey_summary.json").read_text())
    rows = [r for r in read(out, "passkey") if r["length"] == 600]
    lines, numbers = haystack.grid_findings(rows, [600], 64)
    assert summary["finding"] == lines
    assert lines[0] == "0/4 trials pass over 1 length: pass rate 0.00 [0.00, 0.49] (n=4)."
    assert lines[2].startswith("Mean attention entropy 2.00 nats over all 4 trials, every one of which failed")
    assert summary["numbers"] == {"settings": rows[0]["settings"], "model": path, "rope": "rope", "depths": [0, 100],
                                  **numbers}
    assert summary["title"] == "Passkey retrieval, model rope, plain prompt" and "YaRN" in summary["claim"]
    assert summary["results"] == "passkey"


def prompts_of(monkeypatch, path) -> list[str]:
    """The prompts the model is asked, specials included, while still answering them."""
    seen, real, backend = [], haystack.answer_with_entropy, load_tokenizer(path).backend
    monkeypatch.setattr(haystack, "answer_with_entropy", lambda model, ids, *a: (
        seen.append(backend.decode(ids, skip_special_tokens=False)) or real(model, ids, *a)))
    return seen


@pytest.mark.parametrize("flag, templated", [([], False), (["--chat"], True), (["--no-chat"], False)])
def test_passkey_asks_in_plain_text_unless_told_to_use_the_template(model_dir, tmp_path, monkeypatch, flag,
                                                                    templated):
    path = model_dir()
    seen = prompts_of(monkeypatch, path)
    out = tmp_path / "out"
    needle.main(["--model", str(path), "--task", "passkey", "--trials", "1", "--lengths", "450", "--depths", "50",
                 "--max-new-tokens", "2", "--out", str(out), *flag])
    (prompt,) = seen
    assert prompt.startswith("<|im_start|>user\nThere is an important info") is templated
    title = json.loads((out / "passkey_summary.json").read_text())["title"]
    assert title.endswith("chat template" if templated else "plain prompt")
    assert ("<|im_start|>" in prompt) is templated
    assert prompt.endswith("What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is" if templated
                           else "What is the pass key? The pass key is")
    (row,) = read(out, "passkey")
    settings = json.loads((out / "passkey_settings.json").read_text())
    assert row["chat"] is templated and settings[row["settings"]]["chat"] is templated


def test_the_help_says_why_passkey_is_plain_by_default(capsys):
    with pytest.raises(SystemExit):
        needle.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "passkey uses plain text" in text and "explains the phrase" in text and "Fu et al." in text


def test_the_needle_keeps_the_template_by_default(model_dir, tmp_path, monkeypatch):
    path = model_dir()
    seen = prompts_of(monkeypatch, path)
    needle.main(["--model", str(path), "--lengths", "450", "--depths", "50", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "out")])
    assert seen[0].startswith("<|im_start|>user\nThis is a long document")
    assert read(tmp_path / "out")[0]["chat"] is True


def test_rows_and_summary_carry_intervals_from_three_trials_on(model_dir, tmp_path, capsys):
    """Passkey cells of 3 trials: a Wilson interval and an entropy standard error in every row, low <= rate <=
    high; needle cells (one trial each): null ends, n = 1; per length (3 depths): the pooled interval."""
    path, out = str(model_dir()), tmp_path / "out"
    grid = ["--lengths", "450", "600", "--depths", "0", "50", "100", "--max-new-tokens", "3", "--out", str(out)]
    needle.main(["--model", path, "--task", "passkey", "--trials", "3", *grid])
    printed = capsys.readouterr().out
    for r in read(out, "passkey"):
        assert r["pass_rate_n"] == r["entropy_n"] == 3
        assert r["pass_rate_low"] <= r["pass_rate"] <= r["pass_rate_high"] and r["pass_rate"] == r["passed"] / 3
        hand = np.std(r["entropy_trials"], ddof=1) / math.sqrt(3)
        assert r["entropy_se"] == pytest.approx(hand)
    assert {"pass_rate_low", "pass_rate_high", "entropy_se"} <= set(
        (out / "passkey.csv").read_text().splitlines()[0].split(","))
    numbers = json.loads((out / "passkey_summary.json").read_text())["numbers"]
    for r in numbers["per_length"]:
        assert r["pass_rate_n"] == 9 and r["entropy_n"] == 3 and r["pass_rate_low"] <= r["pass_rate"] <= r[
            "pass_rate_high"] and r["entropy_se"] is not None
    # the printed table: the cells, then per length the trials passed, the rate with its interval, the entropy
    head = printed.splitlines()
    passed = next(line for line in head if line.strip().startswith("passed")).split()[1:]
    assert passed == [f"{r['passed']}/9" for r in numbers["per_length"]]
    rate = next(line for line in head if line.strip().startswith("pass rate"))
    first = numbers["per_length"][0]
    assert f"{first['pass_rate']:.2f} [{first['pass_rate_low']:.2f}, {first['pass_rate_high']:.2f}]" in rate
    assert f"{first['entropy']:.2f} ± {first['entropy_se']:.2f}" in printed

    needle.main(["--model", path, *grid])
    for r in read(out):
        assert (r["pass_rate_low"], r["pass_rate_high"], r["pass_rate_n"], r["entropy_se"]) == (None, None, 1, None)
    numbers = json.loads((out / "needle_summary.json").read_text())["numbers"]
    assert all(r["pass_rate_n"] == 3 and r["pass_rate_low"] is not None for r in numbers["per_length"])


def test_rows_of_an_older_run_get_their_intervals(model_dir, tmp_path):
    path, out = str(model_dir()), tmp_path / "out"
    argv = ["--model", path, "--task", "passkey", "--trials", "3", "--lengths", "450", "--depths", "50",
            "--max-new-tokens", "2", "--out", str(out)]
    needle.main(argv)
    (row,) = read(out, "passkey")
    old = {k: v for k, v in row.items() if not k.startswith("pass_rate_") and k not in ("entropy_se", "entropy_n")}
    (out / "passkey.json").write_text(json.dumps([old]))  # as a run before the intervals wrote it
    needle.main(argv)                                      # nothing to run, but the rows get their intervals
    assert read(out, "passkey") == [row]
    assert json.loads((out / "passkey_summary.json").read_text())["numbers"]["per_length"][0]["pass_rate_n"] == 3


def test_dashed_line_at_the_length_ropelite_trained_at(tiny_llama, tmp_path):
    model = tiny_llama(vocab_size=VOCAB, eos_token_id=VOCAB - 1)
    record = {**config_to_hf(model.config)["ropelite"], "trained": {"len": 300, "step": 1}}
    path = save_model(model, tmp_path / "trained", extra_config={"ropelite": record})
    write_byte_tokenizer(path)
    out = tmp_path / "out"
    needle.main(["--model", str(path), "--lengths", "450", "--depths", "50", "--max-new-tokens", "2",
                 "--out", str(out)])
    assert read(out)[0]["train_len"] == 300


def test_resume_skips_done_cells_and_survives_a_kill(model_dir, tmp_path, count_calls):
    path = str(model_dir())
    argv = ["--model", path, "--lengths", "450", "600", "--depths", "0", "100", "--max-new-tokens", "3"]
    calls = count_calls(haystack, "answer_with_entropy")
    out = tmp_path / "full"
    needle.main(argv + ["--out", str(out)])
    full = read(out)
    assert len(calls) == 4 and len(full) == 4
    assert {(r["length"], r["depth"]) for r in full} == {(450, 0), (450, 100), (600, 0), (600, 100)}
    assert set(full[0]) >= {"length", "depth", "tokens", "needle_position", "answer", "score", "pass", "entropy",
                            "entropy_per_layer", "seconds"}
    assert (out / "needle.csv").read_text().count("\n") == 5
    (png,) = out.glob("needle_rope_*.png")
    assert png.read_bytes()[:4] == b"\x89PNG"

    calls.clear()
    needle.main(argv + ["--out", str(out)])  # all done: nothing runs
    assert calls == [] and read(out) == full

    calls.clear()
    calls.kill_at, out = 3, tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        needle.main(argv + ["--out", str(out)])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read(out)) == strip(full[:2])  # the two finished cells survived
    calls.clear()
    calls.kill_at = 0
    needle.main(argv + ["--out", str(out)])
    assert len(calls) == 2
    assert strip(read(out)) == strip(full)

    calls.clear()
    needle.main(argv[:-1] + ["2", "--out", str(out)])  # other settings: every cell runs, old rows are kept
    assert len(calls) == 4 and len(read(out)) == 8
    assert len(set(json.loads((out / "needle_settings.json").read_text()))) == 2


def test_passkey_cells_resume(model_dir, tmp_path, count_calls):
    argv = ["--model", str(model_dir()), "--task", "passkey", "--trials", "2", "--lengths", "450", "600",
            "--depths", "0", "100", "--max-new-tokens", "3"]
    calls = count_calls(haystack, "answer_with_entropy")
    out = tmp_path / "full"
    needle.main(argv + ["--out", str(out)])
    full = read(out, "passkey")
    assert len(calls) == 8 and len(full) == 4  # one call per trial, one row per cell
    calls.clear()
    needle.main(argv + ["--out", str(out)])
    assert calls == [] and read(out, "passkey") == full

    calls.clear()
    calls.kill_at, out = 6, tmp_path / "killed"  # in the third cell's second trial
    with pytest.raises(KeyboardInterrupt):
        needle.main(argv + ["--out", str(out)])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read(out, "passkey")) == strip(full[:2])
    calls.clear()
    calls.kill_at = 0
    needle.main(argv + ["--out", str(out)])
    assert len(calls) == 4 and strip(read(out, "passkey")) == strip(full)


@pytest.mark.parametrize("extra, message", [
    (["--lengths", "100"], "error: length 100 is too short"),
    (["--model", "/nonexistent/model"], "error: model not found"),
    (["--depths", "120"], "error: --depths are percentages"),
    (["--depths", "0:100:x"], "error: bad --depths value '0:100:x'"),
    (["--bogus"], "error: needle.py: unrecognized arguments: --bogus"),
    (["--rope", "yarn", "--factor", "2", "--base", "1e6"],
     "error: a new base is an NTK setting; rope 'yarn' does not take one"),
    (["--rope", "yarn"], "error: --rope yarn needs --factor: the checkpoint runs rope"),
    (["--base", "1e6"], "error: a new base is an NTK setting; rope 'rope' does not take one"),
    (["--rope", "pi", "--factor", "0.5"], "error: rope factor must be >= 1"),
    (["--task", "passkey", "--needle", "x"], "error: --needle is a --task needle flag"),
    (["--task", "passkey", "--pass-recall", "0.3"], "error: --pass-recall is a --task needle flag"),
    (["--task", "passkey", "--trials", "0"], "error: --trials must be at least 1"),
    (["--task", "passkey", "--lengths", "150"], "error: length 150 is too short"),
    (["--haystack", "/nonexistent/hay.txt"], "error: data not found: /nonexistent/hay.txt"),
])
def test_bad_input_is_one_line(model_dir, tmp_path, capsys, extra, message):
    argv = ["--model", str(model_dir()), "--out", str(tmp_path / "o"), *extra]
    with pytest.raises(SystemExit) as exit_:
        run_script(lambda: needle.main(argv))
    assert exit_.value.code == 2
    *notes, err = capsys.readouterr().err.strip().splitlines()
    # the error comes last; before it at most one line, --dtype auto's
    assert err.startswith(message) and len(notes) <= 2 and all(n.startswith(("dtype: ", "rope: --factor not given")) for n in notes)


def test_out_that_is_a_file_is_one_line(model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        run_script(lambda: needle.main(["--model", str(model_dir()), "--out", str(tmp_path / "file")]))
    expected = f"error: --out {tmp_path / 'file'} is a file, not a folder; choose another --out"
    *notes, err = capsys.readouterr().err.strip().splitlines()
    # the error comes last; before it at most one line, --dtype auto's
    assert err == expected and len(notes) <= 2 and all(n.startswith(("dtype: ", "rope: --factor not given")) for n in notes)
