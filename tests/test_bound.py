"""Men et al. 2024's lower bound of the base: the certified scan finds the narrow feasible islands below the bulk,
and the bound behind its steps holds.

Every feasibility check here is an independent direct float64 sum of cos(m b^(-2i/d)) over all m <= L."""

import json
import math

import numpy as np
import pytest
import torch

import analyze
from ropelite import bound
from ropelite.bound import (MEN_RESOLUTION, bulk_base_for_context, context_of_base, first_negative_B, men_B,
                            min_base_for_context, min_base_scan)
from ropelite.rope import rope_inv_freq

D = 128


def min_B(base: float, length: int, dim: int = D) -> float:
    """min over m in [0, length] of sum_i cos(m b^(-2i/d)), directly, in chunks of m."""
    theta = base ** (-2.0 * np.arange(dim // 2) / dim)
    return min(np.cos(np.outer(np.arange(s, min(s + 8192, length + 1)), theta)).sum(1).min()
               for s in range(0, length + 1, 8192))


def feasible(base: float, length: int, dim: int = D) -> bool:
    return min_B(base, length, dim) >= 0


def test_fast_evaluation_equals_direct_sums_well_inside_the_margin():
    """_B_range (angle addition, one matmul) against direct sums, up to m = 2^21: the scan counts a B_m as
    negative only below -ROUNDING, so the two must agree far closer than that."""
    for dim, base in [(128, 1e4), (128, 6.5e7), (64, 5e5)]:
        theta = rope_inv_freq(dim, base)
        x = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        for start in (0, 1 << 20, 1 << 21):
            m = np.arange(start, start + 20_000)
            direct = np.cos(np.outer(m, theta.numpy())).sum(1)
            sines = (x * theta).numpy() @ np.sin(np.outer(m, theta.numpy())).T
            B, got_sines = bound._B_range(theta, start, len(m), sin_weights=x * theta).numpy()
            assert np.abs(B - direct).max() < bound.ROUNDING / 10
            assert np.abs(got_sines - sines).max() < bound.ROUNDING / 10
            assert np.array_equal(bound._B_range(theta, start, len(m)).numpy(), B)


def direct_terms(m: int, u: float, dim: int = D):
    """B_m(u), dB_m/du and d^2B_m/du^2 at u = ln b, written out: phi_i = m e^(-u x_i), x_i = 2i/d."""
    x = 2.0 * np.arange(dim // 2) / dim
    phi = m * np.exp(-u * x)
    return (np.cos(phi).sum(), (x * phi * np.sin(phi)).sum(),
            -(x * x * (phi * phi * np.cos(phi) + phi * np.sin(phi))).sum())


def test_the_curvature_bound_that_certifies_the_steps():
    """The scan's bound, on random points: _terms gives B_m and its slope; C_m(u) bounds |B_m''| on [u, u + s]
    and e^(2s) C_m(u) on [u - s, u]; so Taylor's remainder |B(u +- s) - B(u) -+ s B'(u)| <= s^2 C / 2 holds."""
    rng = np.random.default_rng(0)
    x = torch.arange(0, D, 2, dtype=torch.float64) / D
    for _ in range(300):
        u, m, s = rng.uniform(6, 21), int(rng.integers(1, 1 << 21)), rng.uniform(0, bound.MAX_STEP)
        B, dB, C = (float(t[0]) for t in bound._terms(torch.tensor([float(m)]), x, torch.exp(-u * x)))
        B_direct, dB_direct, _ = direct_terms(m, u)
        assert B == pytest.approx(B_direct, abs=1e-9) and dB == pytest.approx(dB_direct, rel=1e-9, abs=1e-6)
        for v in np.linspace(u, u + s, 7):
            assert abs(direct_terms(m, v)[2]) <= C * (1 + 1e-12)
        for v in np.linspace(u - s, u, 7):
            assert abs(direct_terms(m, v)[2]) <= bound.BELOW * C * (1 + 1e-12)
        for sign, factor in ((1, 1.0), (-1, bound.BELOW)):
            moved = direct_terms(m, u + sign * s)[0]
            assert abs(moved - B - sign * s * dB) <= s * s * factor * C / 2 * (1 + 1e-9) + 1e-9


def test_a_witness_keeps_its_sign_as_far_as_its_reach():
    """Every B_m < 0 stays negative on [u - reach down, u + reach up], and every B_m > 0 stays positive for the
    bulk walk's reach down, checked by direct sums on a grid over each reach."""
    rng = np.random.default_rng(1)
    x = torch.arange(0, D, 2, dtype=torch.float64) / D
    checked = {"up": 0, "down": 0, "positive": 0}
    for _ in range(400):
        u, m = rng.uniform(8, 20), float(rng.integers(1, 1 << 20))
        terms = bound._terms(torch.tensor([m]), x, torch.exp(-u * x))
        B = float(terms[0][0])
        if B < -bound.ROUNDING:
            for name, reach, sign in (("up", bound._reach_up, 1), ("down", bound._reach_down, -1)):
                r = float(reach(*terms)[0])
                assert r > 0
                assert all(direct_terms(int(m), u + sign * v)[0] < 0 for v in np.linspace(0, r, 40))
                checked[name] += 1
        elif B > bound.ROUNDING:
            B_, dB, C = terms
            r = float(bound._reach(B_ - bound.ROUNDING, dB, bound.BELOW * C)[0])
            assert r > 0 and all(direct_terms(int(m), u - v)[0] > 0 for v in np.linspace(0, r, 40))
            checked["positive"] += 1
    assert min(checked.values()) > 50


@pytest.mark.parametrize("length, points", [(1024, (400, 2000, 400)), (4096, (200, 600, 200)),
                                            pytest.param(16384, (100, 150, 60), marks=pytest.mark.slow)])
def test_the_scan_is_certified(length, points):
    """The answer reaches L by direct sums; every base the scan skipped below it is infeasible: checked on a
    grid finer than the resolution just below, coarser further down, and all the way from b = 2; no gap is
    left open, and the infimum is pinned between ``infeasible_below`` and the answer."""
    scan = min_base_scan(D, length)
    b, below = scan.base, scan.infeasible_below
    print(f"L={length}: infimum in [{below:.10g}, {b:.10g}], {scan.bases} bases evaluated")
    assert feasible(b, length) and scan.open_gaps == 0
    assert below <= b <= below * (1 + 2 * MEN_RESOLUTION)
    near = np.linspace(below * (1 - 2e-5), below * (1 - MEN_RESOLUTION / 4), points[0])
    wide = np.geomspace(below * 0.98, below * (1 - 2e-5), points[1])
    far = np.geomspace(2, below * 0.98, points[2])
    assert not [c for c in np.concatenate([far, wide, near]) if feasible(c, length)]


def test_the_witness_heuristics_change_the_cost_not_the_answer(monkeypatch):
    """One kept witness and a fresh search whenever it weakens at all: the same answer, from more work."""
    expected = min_base_scan(D, 4096)
    monkeypatch.setattr(bound, "WITNESSES", 1)
    monkeypatch.setattr(bound, "POOL_ENOUGH", 1.0)
    plain = min_base_scan(D, 4096)
    assert plain.base == pytest.approx(expected.base, rel=2 * MEN_RESOLUTION) and plain.open_gaps == 0
    assert plain.infeasible_below == pytest.approx(expected.infeasible_below, rel=2 * MEN_RESOLUTION)


def test_the_islands_below_the_bulk():
    """At 128K an old grid scan returned 8.25e6 while 4.87e6 is feasible; at 16K it returned 2.34e5 while a
    base that prints as 2.316e5 is (the round 2.316e5 itself is not: the island starts at 231643.65)."""
    b128 = min_base_for_context(D, 131072, start=4.8e6)        # the whole scan from b = 1 takes a few seconds
    assert b128 <= 4.87e6 and feasible(b128, 131072)
    b16 = min_base_for_context(D, 16384, start=2.2e5)
    assert f"{b16:.4g}" == "2.316e+05" and feasible(b16, 16384)
    assert feasible(4.87e6, 131072) and not feasible(2.316e5, 16384)
    assert min_base_for_context(D, 16384) == pytest.approx(b16, rel=2 * MEN_RESOLUTION)   # from b = 1: the same


@pytest.mark.slow
def test_the_whole_scan_at_128K():
    scan = min_base_scan(D, 131072)
    assert scan.open_gaps == 0 and feasible(scan.base, 131072)
    assert scan.base == pytest.approx(min_base_for_context(D, 131072, start=4.8e6), rel=2 * MEN_RESOLUTION)


def test_bulk_is_above_the_infimum_and_feasible_up_to_its_limit():
    length = 1024
    b = min_base_for_context(D, length)
    bulk = bulk_base_for_context(D, length, b, 1.5 * b)
    assert b < bulk < 1.5 * b
    assert all(feasible(c, length) for c in np.geomspace(bulk, 1.5 * b, 300))
    # the walk down stopped at an infeasible base less than one of its steps (at most MAX_STEP in ln b) below
    assert any(not feasible(c, length) for c in np.geomspace(bulk * math.exp(-bound.MAX_STEP), bulk, 300)[:-1])
    assert bulk_base_for_context(D, length, b, bulk * 1.01) == pytest.approx(bulk, rel=1e-6)   # a shorter walk
    assert bulk_base_for_context(D, length, b, 1.001 * b) == b      # feasible all the way down to the start
    # at 4096 the top of the range itself fails, so there is no bulk
    b4 = min_base_for_context(D, 4096)
    assert not feasible(1.5 * b4, 4096) and bulk_base_for_context(D, 4096, b4, 1.5 * b4) is None


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
def test_a_scan_from_the_length_finds_the_same_base(length):
    """The scan covers every base from 1; one started at b = L (no base below L reached L in any case tried)
    finds the same base, up to the resolution (the two walks' bases differ)."""
    for d in (64, 128):
        assert min_base_for_context(d, length) == pytest.approx(min_base_for_context(d, length, start=length),
                                                                rel=2 * MEN_RESOLUTION)
