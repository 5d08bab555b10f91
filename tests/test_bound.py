"""Men et al. 2024's lower bound of the base: the certified scan finds the narrow feasible islands below the bulk.

Every B here is an independent direct float64 sum of cos(m b^(-2i/d)) over all m <= L (no rope.py)."""

import json
import math

import numpy as np
import pytest
import torch

import analyze
from ropelite.bound import (MEN_RESOLUTION, _men_theta, bulk_base_for_context, context_of_base, first_negative_B,
                            men_B, min_base_for_context)
from ropelite.rope import rope_inv_freq

D = 128


def min_B(base: float, length: int, dim: int = D) -> float:
    """min over m in [0, length] of sum_i cos(m b^(-2i/d)), directly, in chunks of m."""
    theta = base ** (-2.0 * np.arange(dim // 2) / dim)
    return min(np.cos(np.outer(np.arange(s, min(s + 8192, length + 1)), theta)).sum(1).min()
               for s in range(0, length + 1, 8192))


def feasible(base: float, length: int, dim: int = D) -> bool:
    return min_B(base, length, dim) >= 0


def test_theta_is_the_rope_frequencies():
    for dim, base in [(128, 1e4), (64, 5e5)]:
        np.testing.assert_array_equal(_men_theta(dim, base), rope_inv_freq(dim, base).numpy())
        assert _men_theta(dim, base).dtype == np.float64
    assert rope_inv_freq(128, 1e4).dtype == torch.float64


def test_slope_bound_that_certifies_the_steps():
    """|B_m(u + du) - B_m(u)| <= m du sum_i (2i/d) theta_i(u), u = ln b: what lets the scan skip bases."""
    rng = np.random.default_rng(0)
    x = 2.0 * np.arange(D // 2) / D
    for _ in range(200):
        u, du, m = rng.uniform(6, 16), rng.uniform(0, 1e-3), int(rng.integers(1, 1 << 17))
        B0, B1 = (np.cos(m * np.exp(-v * x)).sum() for v in (u, u + du))
        assert abs(B1 - B0) <= m * du * (x * np.exp(-u * x)).sum() * (1 + 1e-9) + 1e-9


@pytest.mark.parametrize("length", [1024, 4096])
def test_infimum_is_feasible_and_nothing_on_a_fine_grid_below_is(length):
    b = min_base_for_context(D, length)
    print(f"L={length}: infimum {b:.8g}")
    assert feasible(b, length)
    # islands can only be ruled out on a grid: finer than the resolution just below, coarser further down
    near = np.linspace(b * (1 - 2e-5), b * (1 - 2 * MEN_RESOLUTION), 401)
    wide = np.geomspace(b * 0.98, b * (1 - 2e-5), 2000)
    assert not [c for c in np.concatenate([near, wide]) if feasible(c, length)]


def test_the_issue_examples():
    """Issue 16: at 128K the old 0.2 % scan returned 8.25e6 while 4.87e6 is feasible; at 16K 2.34e5 while a
    base that prints as 2.316e5 is (the round 2.316e5 itself is not: the island starts at 231643.65)."""
    b128 = min_base_for_context(D, 131072, start=4.8e6)        # the full scan from L takes minutes
    assert b128 <= 4.87e6 and feasible(b128, 131072)
    b16 = min_base_for_context(D, 16384, start=2.2e5)
    assert f"{b16:.4g}" == "2.316e+05" and feasible(b16, 16384)
    assert feasible(4.87e6, 131072) and not feasible(2.316e5, 16384)
    assert min_base_for_context(D, 16384) == pytest.approx(b16, rel=2 * MEN_RESOLUTION)   # from L: the same


def test_bulk_is_above_the_infimum_and_feasible_up_to_its_limit():
    length = 1024
    b = min_base_for_context(D, length)
    bulk = bulk_base_for_context(D, length, b, 1.5 * b)
    assert bulk >= b
    assert all(feasible(c, length) for c in np.geomspace(bulk, 1.5 * b, 300))


def test_bound_table_prints_the_paper_beside(tmp_path, capsys):
    out = tmp_path / "bound"
    analyze.main(["bound", "--lengths", "1024", "2048", "--plot-bases", "1e4", "--bulk-up-to", "1.2",
                  "--out", str(out)])
    rows = {r["length"]: r for r in json.loads((out / "bound.json").read_text())["rows"]}
    printed = capsys.readouterr().out
    for L, paper in [(1024, "4.3e+03"), (2048, "1.6e+04")]:
        r = rows[L]
        assert r["resolution"] == MEN_RESOLUTION and r["bulk_up_to"] == 1.2
        assert feasible(r["min_base"], L) and (r["bulk_base"] is None or r["bulk_base"] >= r["min_base"])
        line = next(x for x in printed.splitlines() if x.split()[:1] == [str(L)])
        assert f"{r['min_base']:.7g}" in line and paper in line
    assert "resolution 1e-07" in printed
    summary = json.loads((out / "bound_summary.json").read_text())   # the headline, for paper.py
    assert [r["min_base"] for r in summary["numbers"]["rows"]] == [rows[L]["min_base"] for L in (1024, 2048)]
    for line, L in zip(summary["finding"], (1024, 2048)):
        verdict = "meets its own criterion" if feasible(rows[L]["paper_base"], L) else "fails its own criterion"
        assert line.startswith(f"L={L} (d=128): smallest base ") and verdict in line


# --------------------------------------------------------------------------------------------------------------
# Men et al. 2024: the base bounds the context
# --------------------------------------------------------------------------------------------------------------

def test_men_B_closed_form():
    assert men_B(0, 128, 1e4) == pytest.approx(64.0)
    assert men_B(0, 64, 5e5) == pytest.approx(32.0)
    m = np.array([1, 17, 4096])
    by_hand = [sum(math.cos(mm * 1e4 ** (-2 * i / 128)) for i in range(64)) for mm in m]
    np.testing.assert_allclose(men_B(m, 128, 1e4), by_hand, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("base", [500.0, 3000.0, 2e4])
def test_first_negative_B_matches_brute_force(base):
    B = men_B(np.arange(20_001), 128, base)
    negative = np.flatnonzero(B < 0)
    expected = int(negative[0]) if negative.size else None
    assert first_negative_B(128, base, 20_000) == expected
    ctx = context_of_base(128, base, 20_000)
    assert ctx == (20_000 if expected is None else expected - 1)
    assert first_negative_B(128, base, ctx) is None          # it reaches ctx ...
    if expected is not None:
        assert first_negative_B(128, base, ctx + 1) == ctx + 1  # ... and not one more


PAPER = {1024: 4.3e3, 2048: 1.6e4, 4096: 2.7e4, 8192: 8.4e4}   # Men et al. Table, d = 128


@pytest.mark.parametrize("length", sorted(PAPER))
def test_min_base_for_context(length):
    d = 128
    b = min_base_for_context(d, length)
    print(f"d={d} L={length}: min base {b:.4g} (paper {PAPER[length]:.2g}, ratio {b / PAPER[length]:.2f})")
    m = np.arange(length + 1)
    assert (men_B(m, d, b) >= 0).all()                       # it reaches L ...
    for lower in np.linspace(0.98 * b, b, 50, endpoint=False):
        assert (men_B(m, d, lower) < 0).any(), lower       # ... and nothing just below does
    assert context_of_base(d, b, 4 * length) >= length
    assert PAPER[length] / 1.5 <= b <= PAPER[length] * 1.5


@pytest.mark.parametrize("length", [64, 256, 1024])
def test_min_base_scan_from_the_length_loses_nothing(length):
    """min_base_for_context starts its scan at b = L; starting far lower (b = 2) finds the same base, up to the
    grid (the two scans' grid points differ; the refined step is about ratio/refine = 2e-5 relative)."""
    for d in (64, 128):
        assert min_base_for_context(d, length) == pytest.approx(min_base_for_context(d, length, start=2.0), rel=1e-4)
