"""paper.py: the report names each piece's command, shows its tables (pivoted where asked) and figures, and a
failed piece is reported as failed and makes the run end in a one-line error."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
import paper  # noqa: E402
from ropelite.errors import RopeliteError  # noqa: E402
from ropelite.model import save_model  # noqa: E402


def test_pivot_turns_long_rows_wide():
    rows = [{"pair": 0, "rope": "rope", "scale": 1.0}, {"pair": 0, "rope": "pi x4", "scale": 4.0},
            {"pair": 1, "rope": "rope", "scale": 1.0}, {"pair": 1, "rope": "pi x4", "scale": 4.0}]
    assert paper.pivot(rows, "pair", "rope", "scale") == [{"pair": 0, "rope": 1.0, "pi x4": 4.0},
                                                          {"pair": 1, "rope": 1.0, "pi x4": 4.0}]
    table = paper.markdown_table(paper.pivot(rows, "pair", "rope", "scale"))
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
