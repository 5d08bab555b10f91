"""Men et al. 2024, "Base of RoPE Bounds Context Length": the lower bound of the base per context length.

B_m = sum_{i<d/2} cos(m theta_i), theta_i = b^(-2i/d) (their Theorem 1), is the long-term decay of the ability to
attend more to similar tokens than to random ones. A base b reaches the context L when B_m >= 0 for every
m <= L; ``min_base_for_context`` finds the smallest such b by a scan whose every step is certified, and
``bound_row`` is one row of their table beside the base they printed (``analyze.py bound``).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import RopeliteError
from .presets import PRESETS, preset
from .rope import rope_inv_freq


def _men_theta(dim: int, base: float) -> np.ndarray:
    """theta_i of plain RoPE, in float64 numpy (B is too sensitive for float32)."""
    return rope_inv_freq(dim, base).numpy()


def men_B(m, dim: int, base: float) -> np.ndarray:
    """B_{m,theta} = sum_{i=0}^{d/2-1} cos(m theta_i) (Men et al. 2024, Theorem 1): the long-term decay of the
    ability to attend more to similar tokens than to random ones. Vectorised over m; float64."""
    theta = _men_theta(dim, base)
    return np.cos(np.asarray(m, dtype=np.float64)[..., None] * theta).sum(-1)


def _B_range(theta: np.ndarray, start: int, count: int) -> np.ndarray:
    """B_m for m = start .. start+count-1, fast: with m = m0 + k, cos(m theta) = cos(k theta) cos(m0 theta)
    - sin(k theta) sin(m0 theta), so two (c, d/2) @ (d/2, J) real products give c*J values of B."""
    c = max(1, math.isqrt(count))
    k = np.arange(c)[:, None] * theta[None, :]                                      # (c, d/2)
    m0 = theta[:, None] * (start + c * np.arange(-(-count // c)))[None, :]          # (d/2, J)
    B = np.cos(k) @ np.cos(m0) - np.sin(k) @ np.sin(m0)                             # (c, J)
    return B.T.reshape(-1)[:count]                                                  # (J, c) -> m order


def _negative_B(theta: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(m, B_m) for every negative B_m of the first chunk of m in [0, max_len] that has one, or None if B_m >= 0
    throughout. Doubling chunks: a base that fails early costs little."""
    start, chunk = 0, 1024
    while start <= max_len:
        count = min(chunk, max_len + 1 - start)
        B = _B_range(theta, start, count)
        negative = np.flatnonzero(B < 0)
        if negative.size:
            return start + negative, B[negative]
        start, chunk = start + count, chunk * 2
    return None


def first_negative_B(dim: int, base: float, max_len: int) -> int | None:
    """The smallest m in [0, max_len] with B_m < 0, or None."""
    found = _negative_B(_men_theta(dim, base), max_len)
    return None if found is None else int(found[0][0])


def context_of_base(dim: int, base: float, max_len: int = 1 << 21) -> int:
    """L_theta = sup{L : B_m >= 0 for all m in [0, L]}, searched up to ``max_len`` (returned if never negative)."""
    first = first_negative_B(dim, base, max_len)
    return max_len if first is None else first - 1


# The feasible set {b : B_m >= 0 for all m <= L} is not monotone in b: B oscillates, and feasible islands a
# fraction of a percent wide lie below the bulk (d=128, 128K: 4.87e6 works, most bases up to 8.2e6 do not), so
# neither bisection nor a fixed grid finds the smallest base. What makes a scan exact is a bound on how fast B
# moves with the base. With u = ln b, theta_i = e^(-u x_i), x_i = 2i/d:
#     dB_m/du = sum_i sin(m theta_i) m x_i theta_i,   so   |dB_m/du| <= m S(u),   S(u) = sum_i x_i theta_i,
# and S falls as u grows, so S(u) bounds the slope on all of [u, u + du]. Hence a base where B_m < 0 stays
# infeasible for du < -B_m / (m S), and a feasible one stays feasible for du < min_m B_m / (m S): each base
# tried certifies an interval beyond it, and the scan steps to its end. Only where min_m B_m is within a hair of
# 0 does the certified step shrink below ``resolution``; the scan then steps by ``resolution`` and that gap (at
# most ``resolution`` wide in ln b) is the only place an island can hide.

MEN_RESOLUTION = 1e-7


def _certified_step(dim: int, length: int, base: float) -> tuple[bool, float]:
    """(B_m >= 0 for all m <= length, du): the status holds on [ln b, ln b + du) (0 when nothing is certified)."""
    theta = _men_theta(dim, base)
    slope = (theta * np.arange(0, dim, 2) / dim).sum()            # S(u), the slope bound per unit m
    negative = _negative_B(theta, length)
    if negative is not None:
        m, B = negative
        return False, float((-B / (m * slope)).max())
    m = np.arange(1, length + 1)
    return True, float((_B_range(theta, 1, length) / (m * slope)).min())


def _scan(dim: int, length: int, start: float, stop: float, resolution: float):
    """Yield (base, feasible, certified) for the bases of the certified scan from ``start`` up to ``stop``;
    ``certified``: the status holds up to the next base (else the next base is ``resolution`` away, unproven)."""
    u, end = math.log(start), math.log(stop)
    while u <= end:
        feasible, du = _certified_step(dim, length, math.exp(u))
        yield math.exp(u), feasible, du >= resolution
        u += max(du, resolution)


def min_base_for_context(dim: int, length: int, start: float | None = None, resolution: float = MEN_RESOLUTION,
                         max_base: float = 1e12) -> float:
    """The smallest base b with B_m >= 0 for all m <= length (Men et al.'s lower bound of the base), by the
    certified scan above from ``start`` (default: the length; bases below L never reached L in any case we
    scanned, and tests scan from 2): every base below the answer is proven infeasible except in gaps at most
    ``resolution`` wide (relative, in b), and the answer is feasible and at most ``resolution`` above the first
    feasible base."""
    for base, feasible, _ in _scan(dim, length, float(start if start is not None else length), max_base,
                                   resolution):
        if feasible:
            return base
    raise RopeliteError(f"no base below {max_base:g} reaches {length} tokens at d={dim}")


def bulk_base_for_context(dim: int, length: int, start: float, stop: float,
                          resolution: float = MEN_RESOLUTION) -> float | None:
    """The smallest base of the scan from ``start`` (e.g. the smallest feasible base) above which every scanned
    base up to ``stop`` reaches ``length``, or None if the last one does not. Certified between scanned bases
    except across gaps of ``resolution`` where min_m B_m is within a hair of 0."""
    bulk = None
    for base, feasible, _ in _scan(dim, length, start, stop, resolution):
        bulk = (bulk or base) if feasible else None
    return bulk


# --------------------------------------------------------------------------------------------------------------
# The table: ours beside the paper's, and how far known models' bases reach
# --------------------------------------------------------------------------------------------------------------

# Men et al. 2024, their table of lower bounds of the base (d = 128), as printed (two digits).
PAPER_BASES_D128 = {1024: 4.3e3, 2048: 1.6e4, 4096: 2.7e4, 8192: 8.4e4, 16384: 3.1e5, 32768: 6.4e5,
                    65536: 2.1e6, 131072: 7.8e6, 262144: 3.6e7, 524288: 6.4e7, 1048576: 5.1e8}

DEFINITIONS = {
    "B_m": "sum_{i<d/2} cos(m b^(-2i/d)) (Men et al. 2024, Theorem 1)",
    "min_base": "smallest base with B_m >= 0 for all m <= length, by a scan whose steps are certified by a "
                "slope bound on B: every base below is proven infeasible except in gaps of relative width "
                "<= resolution, and the true infimum is at most resolution below",
    "bulk_base": "smallest scanned base above which every scanned base up to bulk_up_to * min_base is "
                 "feasible (null: the last one is not)",
    "*_context": "largest L with B_m >= 0 for all m <= L, searched up to 2 * length",
    "paper_base_reaches": "the printed base satisfies B_m >= 0 for all m <= length",
    "context_reached": "largest L with B_m >= 0 for all m <= L, searched up to 2^22"}


def bound_row(dim: int, length: int, resolution: float = MEN_RESOLUTION, bulk_up_to: float = 1.5) -> dict:
    """One row of the table (keys: DEFINITIONS): our smallest base and bulk, the paper's printed base (d = 128)
    and whether it satisfies its own criterion, and the contexts both reach (searched up to 2 * length)."""
    found = min_base_for_context(dim, length, resolution=resolution)
    bulk = bulk_base_for_context(dim, length, found, found * bulk_up_to, resolution)
    row = {"length": length, "dim": dim, "resolution": resolution, "bulk_up_to": bulk_up_to, "min_base": found,
           "bulk_base": bulk, "min_base_context": context_of_base(dim, found, 2 * length)}
    paper = PAPER_BASES_D128.get(length) if dim == 128 else None
    reached = None if paper is None else context_of_base(dim, paper, 2 * length)
    row.update(paper_base=paper, paper_base_reaches=None if paper is None else reached >= length,
               paper_base_context=reached, min_base_over_paper=None if paper is None else found / paper)
    return row


def known_models() -> list[tuple]:
    """(name, head dim, base, training length) of the preset models: their base is known without loading them."""
    return [(name, c.head_dim, c.rope.theta, c.rope.original_max_position_embeddings)
            for name, c in ((name, preset(name)) for name in PRESETS)]


def model_rows(models: list[tuple]) -> list[dict]:
    """How far the base of each (name, head dim, base, training length or None) reaches, next to that length."""
    rows = []
    for name, dim, base, trained in models:
        reached = context_of_base(dim, base, 1 << 22)
        rows.append({"model": name, "dim": dim, "base": base, "trained_length": trained, "context_reached": reached,
                     "reaches_trained_length": None if trained is None else reached >= trained})
    return rows


CLAIM = ("Men et al. 2024 print, per context length L at d = 128, the lower bound of the base: the smallest b "
         "whose B_m >= 0 for every m <= L")


def summary(rows: list[dict]) -> tuple[str, str, list[str], dict]:
    """(title, claim, finding lines, numbers) for ``io.write_summary``: per length our smallest base beside the
    paper's, and whether the paper's base meets its own criterion. Every number is computed exactly (a certified
    scan and direct sums, no sampling), so none carries an interval."""
    finding, numbers = [], []
    for r in rows:
        line = f"L={r['length']} (d={r['dim']}): smallest base {r['min_base']:.4g}"
        if r["paper_base"] is not None:
            line += (f", the paper's {r['paper_base']:.2g} (ours / theirs {r['min_base_over_paper']:.2f}); "
                     + ("the paper's base meets its own criterion" if r["paper_base_reaches"] else
                        f"the paper's base fails its own criterion: it reaches {r['paper_base_context']} tokens"))
        finding.append(line)
        numbers.append({k: r[k] for k in ("length", "dim", "min_base", "bulk_base", "paper_base",
                                          "paper_base_reaches", "paper_base_context")})
    printed = [r for r in rows if r["paper_base"] is not None]
    if printed:
        fails = sum(not r["paper_base_reaches"] for r in printed)
        finding.append(f"The paper's printed base fails its own criterion at {fails} of the {len(printed)} "
                       "lengths it prints (exact: certified scans and direct sums, no sampling).")
    return "Men et al.'s lower bound of the base per context length", CLAIM, finding, {"rows": numbers}
