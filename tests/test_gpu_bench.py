"""benchmarks/gpu.py --dry-run: the GPU benchmark's own code at toy sizes on CPU, so that it cannot rot before a
GPU runs it; and its FLOP formula and layer extrapolation against hand-computed values."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu  # noqa: E402
from ropelite.presets import preset  # noqa: E402


def test_flops_per_token_of_llama2_7b():
    """6 N + 6 n_layers n_heads head_dim len, N = 6.738e9 parameters less the 32000 x 4096 embedding table."""
    c = preset("LLaMa-2-7B")
    n = 6_738_415_616 - 32000 * 4096
    assert gpu.train_flops_per_token(c, 4096) == 6 * n + 6 * 32 * 32 * 128 * 4096
    tied = preset("SmolLM2-135M")                                  # the tied matrix multiplies once, as lm_head
    assert gpu.train_flops_per_token(tied, 0) == 6 * gpu.param_count(tied)


def test_extrapolation_is_linear_in_the_depth():
    figures = [{"seconds": 1.0, "peak_GiB": 10.0}, {"seconds": 1.5, "peak_GiB": 12.0}]     # at 2 and 4 blocks
    assert gpu.extrapolate(figures, (2, 4), 32) == (1.5 + 0.25 * 28, 12.0 + 1.0 * 28)
    assert gpu.extrapolate([{"seconds": 2.0, "peak_GiB": None}], (30,), 30) == (2.0, None)
    noisy = [{"seconds": 1.5, "peak_GiB": 10.0}, {"seconds": 1.0, "peak_GiB": 12.0}]      # 4 blocks ran faster
    assert gpu.extrapolate(noisy, (2, 4), 32) == (1.0 + 0.25 * 28, 12.0 + 1.0 * 28)


@pytest.mark.slow
def test_dry_run_writes_every_section_without_an_error(tmp_path):
    out = gpu.main(["--dry-run", "--out", str(tmp_path)])
    result = json.loads(out.read_text())
    assert out.name == "gpu-dry-run-cpu.json" and (tmp_path / "gpu-dry-run-cpu.md").is_file()
    rows = result["kernels"] + result["train"] + result["eval"] + [result["needle"]]
    assert not [row["error"] for row in rows if "error" in row]
    assert [k["dtype"] for k in result["kernels"]] == ["float32", "bfloat16"] and all(k["ran"] for k in result["kernels"])
    assert [(r["model"], r["len"]) for r in result["train"]] == [
        ("SmolLM2-135M (toy)", 64), ("SmolLM2-135M (toy)", 128), ("LLaMa-2-7B (toy)", 64), ("LLaMa-2-7B (toy)", 128)]
    scaled = result["train"][2]
    assert scaled["layers_measured"] == [2, 4] and scaled["scaled"] == "scaled to 8 layers"
    assert all(r["tokens_per_s"] > 0 and r["estimate_GiB"] > 0 for r in result["train"] + result["eval"])
    assert 0 < result["needle"]["mean_entropy_nats"] <= 5.6        # at most ln(prompt length) = ln 256 = 5.55
    assert "DRY RUN" in (tmp_path / "gpu-dry-run-cpu.md").read_text()
