"""benchmarks/gpu.py --dry-run: the GPU benchmark's own code paths at toy sizes on CPU, so that it cannot rot
before a GPU runs it; its plan and time caps; and its FLOP formula and layer extrapolation against hand-computed
values."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu  # noqa: E402
import torch  # noqa: E402
from ropelite.model import choose_kernel  # noqa: E402
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


def test_measure_stops_repeating_once_its_deadline_has_passed():
    calls = []
    _, timed, peak = gpu.measure(lambda: calls.append(1), torch.device("cpu"), 5, deadline=0.0)
    assert timed == 1 and len(calls) == 2 and peak is None              # the warm-up call, then one timed
    _, timed, _ = gpu.measure(lambda: calls.append(1), torch.device("cpu"), 5)
    assert timed == 5


def test_the_full_run_keeps_to_its_budget_by_construction():
    """Every stage has a step count and a cap, the caps add up to at most 8 minutes, and at an H100's dense bf16
    peak every stage's planned time is within its cap; the dry run has the same stages."""
    assert gpu.BUDGET_S == 480 and sum(s.cap_s for s in gpu.FULL) <= gpu.BUDGET_S
    assert all(s.steps >= 1 and s.cap_s > 0 for s in gpu.FULL)
    plan = gpu.plan_rows(gpu.FULL, False, 989e12)
    assert all(0 < row["expected_s"] < row["cap_s"] for row in plan), plan
    same = [(s.kind, s.model, s.mode, s.scaled, s.micro_batches) for s in gpu.FULL]
    assert same == [(s.kind, s.model, s.mode, s.scaled, s.micro_batches) for s in gpu.DRY]


@pytest.mark.slow
def test_dry_run_takes_the_gpu_code_paths(tmp_path, capsys):
    """Kernel choice for CUDA per dtype (run where the CPU has the kernel, else its one-line error), the fused
    AdamW and AdamW8bit the real run builds, FSDP2 on one gloo process, CPU figures of MFU and memory (the
    estimate within 1.2x of the measured live tensor peak), the plan printed first, and the files in --out only."""
    results = ROOT / "benchmarks" / "results"
    before = sorted(results.iterdir()) if results.is_dir() else []
    out = gpu.main(["--dry-run", "--out", str(tmp_path)])
    log = capsys.readouterr().err
    assert log.index("plan (budget 480 s") < log.index("] kernels SmolLM2-135M")
    assert (sorted(results.iterdir()) if results.is_dir() else []) == before       # nothing in the source tree
    result = json.loads(out.read_text())
    assert out == tmp_path / "gpu-dry-run-cpu.json" and "DRY RUN" in (tmp_path / "gpu-dry-run-cpu.md").read_text()
    assert "CPU figure" in result["memory_basis"] and "CPU figure" in result["mfu_basis"]

    kernels = result["kernels"]
    assert len(kernels) == 2 * 3 * 2                                 # 2 models x 3 dtypes x (prefill, cached step)
    for row in kernels:
        c = preset(row["model"])
        dtype = getattr(torch, row["dtype"])
        choice = choose_kernel("cuda", dtype, c.num_attention_heads, c.num_key_value_heads, row["call"] == "prefill")
        assert row["choice"] == choice.name and row["expand_kv"] == choice.expand_kv
        cpu_has_it = dtype != torch.float32 and row["call"] == "prefill"   # flash; the CPU has no memory-efficient
        assert row["ran"] == cpu_has_it, row
        if not cpu_has_it:
            assert "no O(L)-memory attention kernel" in row["error_path"] and "--dtype bf16" in row["error_path"]
    assert any(row["expand_kv"] for row in kernels)                  # fp32 with GQA expands k/v

    train = result["train"]
    assert not [row["error"] for row in train + result["eval"] + result["needle"] if "error" in row]
    assert [(r["model"], r["len"], r["mode"]) for r in train] == [
        ("SmolLM2-135M (toy)", 64, "bf16"), ("SmolLM2-135M (toy)", 128, "bf16"), ("SmolLM2-135M (toy)", 64, "fsdp"),
        ("LLaMa-2-7B (toy)", 64, "bf16"), ("LLaMa-2-7B (toy)", 128, "bf16"),
        ("LLaMa-2-7B (toy)" if gpu.has_torchao() else "LLaMa-2-7B", 128, "lean")]
    measured = [r for r in train if "skipped" not in r]
    assert all(r["optimizer"] == ("AdamW8bit" if r["mode"] == "lean" else "AdamW (fused)") for r in measured)
    assert train[2]["micro_batches"] == 2 and train[3]["scaled"] == "scaled to 8 layers"
    for r in measured:
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["peak_GiB"] > 0
        assert 1 / 1.2 < r["estimate_GiB"] / r["peak_GiB"] < 1.2, r
    if not gpu.has_torchao():
        assert "torchao" in train[-1]["skipped"]
    assert all(r["peak_GiB"] > 0 and r["estimate_GiB"] > 0 for r in result["eval"])
    needle = result["needle"][0]
    assert needle["peak_GiB"] > 0 and 0 < needle["mean_entropy_nats"] <= 5.6  # at most ln(prompt length) = ln 256
