"""paper.py: the report names each piece's command, shows its tables (pivoted where asked) and figures, and a
failed piece is reported as failed and makes the run end in a one-line error."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
import paper  # noqa: E402
from ropelite.errors import RopeliteError  # noqa: E402
from ropelite.hf import save_model  # noqa: E402
from ropelite.io import markdown_table, pivot, write_summary  # noqa: E402


def test_pivot_turns_long_rows_wide():
    rows = [{"pair": 0, "rope": "rope", "scale": 1.0}, {"pair": 0, "rope": "pi x4", "scale": 4.0},
            {"pair": 1, "rope": "rope", "scale": 1.0}, {"pair": 1, "rope": "pi x4", "scale": 4.0}]
    assert pivot(rows, "pair", "rope", "scale") == [{"pair": 0, "rope": 1.0, "pi x4": 4.0},
                                                          {"pair": 1, "rope": 1.0, "pi x4": 4.0}]
    table = markdown_table(pivot(rows, "pair", "rope", "scale"))
    assert table.splitlines()[:3] == ["| pair | rope | pi x4 |", "|---|---|---|", "| 0 | 1 | 4 |"]


def test_report_of_a_piece_and_of_a_failed_one(tmp_path, tiny_llama):
    save_model(tiny_llama(), tmp_path / "tiny")
    out = tmp_path / "run"
    paper.main(["--model", str(tmp_path / "tiny"), "--only", "freqs", "--out", str(out)])
    report = (out / "report.md").read_text()
    command = (f"python analyze.py freqs --model {tmp_path / 'tiny'} --device cpu --rope rope pi ntk yarn dynamic "
               f"llama3 --factor 4 --out {out / 'freqs'}")
    assert command in report and "Finished in" in report
    assert "| pair | rope | pi x4 | ntk x4 | yarn x4 | dynamic x4 | llama3 x4 |" in report   # 8 pairs (head_dim 16)
    assert "| 7 | 1 | 4 | 4 |" in report            # the slowest pair: PI and NTK-aware both scale it by s
    assert "![freqs.png](freqs/freqs.png)" in report and (out / "freqs" / "freqs.png").is_file()

    with pytest.raises(RopeliteError, match="pieces that failed: freqs"):
        paper.main(["--model", str(tmp_path / "missing"), "--only", "freqs", "--out", str(tmp_path / "bad")])
    assert "**Failed** with exit status 2" in (tmp_path / "bad" / "report.md").read_text()


def test_cells_with_newlines_and_pipes_stay_in_their_row():
    table = markdown_table([{"answer": "The key is 4|2.\nBye", "pass": True}])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[2] == "| The key is 4\\|2.<br>Bye | True |"


def test_each_needle_piece_writes_its_own_folder(tmp_path):
    args = paper.argparse.Namespace(model="smollm2", device="cpu", scale="mini", only=["needle"], out=str(tmp_path))
    folders = [paper.out_folder(step) for step in paper.plan(args)]
    assert folders == [tmp_path / "needle-rope", tmp_path / "needle-yarn"]


def test_a_rerun_that_finds_everything_done_keeps_the_real_time(tmp_path, tiny_llama, monkeypatch):
    save_model(tiny_llama(), tmp_path / "tiny")
    out = tmp_path / "run"
    run_args = ["--model", str(tmp_path / "tiny"), "--only", "freqs", "--out", str(out)]
    paper.main(run_args)
    first = paper.json.loads((out / paper.PIECES_FILE).read_text())["freqs"]
    monkeypatch.setattr(paper.time, "time", lambda: 1e9)  # the rerun "takes" 0 s: easy to tell apart
    paper.main(run_args)
    again = paper.json.loads((out / paper.PIECES_FILE).read_text())["freqs"]
    assert again["seconds"] == first["seconds"] and again["rerun_seconds"] == 0
    report = (out / "report.md").read_text()
    assert f"Finished in {first['seconds']:.0f} s. (A later rerun found everything done in 0 s.)" in report
    assert "What it printed:" in report and "[freqs.csv](freqs/freqs.csv)" in report


def test_new_results_or_a_failure_take_the_new_time(tmp_path):
    step = {"key": "ppl", "argv": ["eval_ppl.py", "--out", str(tmp_path)]}
    (tmp_path / "ppl.json").write_text("[1]")
    pieces = {}
    paper.record(pieces, step, 0, 100.0)
    paper.record(pieces, step, 0, 2.0)                      # nothing new: the 100 s stay
    assert pieces["ppl"]["seconds"] == 100.0
    write_summary(tmp_path, "ppl", "t", "c", ["a line"], {})  # a summary is made from the results: still nothing new
    paper.record(pieces, step, 0, 3.0)
    assert pieces["ppl"]["seconds"] == 100.0 and pieces["ppl"]["rerun_seconds"] == 3.0
    (tmp_path / "ppl.json").write_text("[1, 2]")            # a row more: this run's time
    paper.record(pieces, step, 0, 50.0)
    assert pieces["ppl"] == {"code": 0, "seconds": 50.0, "fingerprint": paper.fingerprint(tmp_path)}
    paper.record(pieces, step, 3, 1.0)                       # a failure always shows
    assert pieces["ppl"]["code"] == 3 and pieces["ppl"]["seconds"] == 1.0


def test_the_summary_quotes_each_pieces_own_summary_files_and_nothing_else(tmp_path):
    """paper.py knows no script's keys: a piece's findings are the summary files its script wrote. A piece whose
    folder holds results but no summary (as every folder did before the scripts wrote one) shows none."""
    write_summary(tmp_path / "ppl", "ppl", "Perplexity past the training length", "NTK holds, RoPE fails",
                  ["16384 tokens (n = 4 documents): rope 31.10, yarn x4 11.20.", "Lowest past 8192: yarn x4."],
                  {"rows": []})
    (tmp_path / "needle-rope").mkdir()
    (tmp_path / "needle-rope" / "needle.json").write_text(paper.json.dumps([
        {"rope": "rope", "length": 1000, "depth": 50, "pass_rate": 1.0, "entropy": 2.5}]))
    steps = [{"key": "ppl", "title": "ppl", "argv": ["eval_ppl.py", "--out", str(tmp_path / "ppl")]},
             {"key": "needle-rope", "title": "needle", "argv": ["needle.py", "--out", str(tmp_path / "needle-rope")]},
             {"key": "attention", "title": "attention", "argv": ["analyze.py", "--out", str(tmp_path / "missing")]}]
    report = paper.write_report(tmp_path, steps, {}).read_text()
    assert ("## Summary: what each finding looks like here, beside the paper's claim\n\n"
            "### Perplexity past the training length\n\nPaper: NTK holds, RoPE fails\n\nMeasured here:\n\n"
            "- 16384 tokens (n = 4 documents): rope 31.10, yarn x4 11.20.\n- Lowest past 8192: yarn x4.\n") in report
    assert report.count("### ") == 1 and "cells pass" not in report
    (tmp_path / "ppl" / "ppl_summary.json").unlink()
    assert paper.summary(steps) == [] and "## Summary" not in paper.write_report(tmp_path, steps, {}).read_text()


def test_a_summary_file_that_is_not_one_is_an_error(tmp_path):
    (tmp_path / "ppl").mkdir()
    (tmp_path / "ppl" / "ppl_summary.json").write_text('{"title": "no claim"}')
    step = {"key": "ppl", "title": "ppl", "argv": ["eval_ppl.py", "--out", str(tmp_path / "ppl")]}
    with pytest.raises(RopeliteError, match="is not a results summary"):
        paper.summary([step])


def interval(label, estimate, low, high, n=10):
    return {"label": label, "estimate": estimate, "low": low, "high": high, "n": n, "method": "bootstrap"}


def test_a_difference_reproduces_only_when_the_intervals_separate(tmp_path):
    """The summary's comparisons, judged by stats.compare: separate and as claimed -> reproduces; separate the
    other way -> against; overlapping or missing intervals -> cannot tell."""
    claim = "PI's JS above NTK's"
    cases = [
        (interval("pi", 0.05, 0.04, 0.06), interval("ntk", 0.001, 0.0, 0.002), "reproduces"),
        (interval("pi", 0.001, 0.0, 0.002), interval("ntk", 0.05, 0.04, 0.06), "goes against the paper"),
        (interval("pi", 0.03, 0.01, 0.05), interval("ntk", 0.02, 0.004, 0.04),
         "cannot tell: the 95 % intervals overlap"),
        (interval("pi", 0.05, None, None, 2), interval("ntk", 0.001, None, None, 2),
         "cannot tell: fewer than 3 units, no interval")]
    comparisons = [{"claim": claim, "expected": "higher", "a": a, "b": b} for a, b, _ in cases]
    write_summary(tmp_path / "attention", "attention", "JS", "PI moves attention most", ["a line"],
                  {"comparisons": comparisons})
    step = {"key": "attention", "title": "attention", "argv": ["analyze.py", "--out", str(tmp_path / "attention")]}
    lines = paper.summary([step])
    verdicts = lines[lines.index("Verdict (\"reproduces\" only where the 95 % intervals separate):") + 2:][:4]
    assert [v.split("**")[1] for v in verdicts] == [word for *_, word in cases]
    assert verdicts[0] == ("- PI's JS above NTK's: **reproduces** (pi 0.05 [0.04, 0.06] (n=10) vs ntk 0.001 "
                           "[0, 0.002] (n=10)).")
    assert verdicts[3].endswith("(pi 0.05 (n=2) vs ntk 0.001 (n=2)).")
    assert paper.verdict({**comparisons[0], "expected": "lower"}).startswith(f"{claim}: **goes against the paper**")
    write_summary(tmp_path / "attention", "attention", "JS", "c", ["a line"], {})   # no comparisons: no verdict
    assert not any(line.startswith("Verdict") for line in paper.summary([step]))


def test_the_mini_finetune_says_what_it_can_and_cannot_show(tmp_path):
    args = paper.argparse.Namespace(model="smollm2", device="cpu", scale="mini", only=["train"], out=str(tmp_path))
    step, = paper.plan(args)
    section = paper.piece_section(tmp_path, step, None)
    assert step["title"] == "A short YaRN finetune: held-out loss"
    assert "cannot show: any gain past the training length" in section and "never sees a position beyond 512" in section
