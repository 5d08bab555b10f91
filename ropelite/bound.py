"""Men et al. 2024, "Base of RoPE Bounds Context Length": the lower bound of the base per context length.

B_m = sum_{i<d/2} cos(m theta_i), theta_i = b^(-2i/d) (their Theorem 1), is the long-term decay of the ability to
attend more to similar tokens than to random ones. A base b reaches the context L when B_m >= 0 for every
m <= L; ``min_base_for_context`` finds the smallest such b by a scan whose every step is certified, and
``bound_row`` is one row of their table beside the base they printed (``analyze.py bound``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import RopeliteError
from .presets import PRESETS, preset
from .rope import rope_inv_freq

# --------------------------------------------------------------------------------------------------------------
# B_m, and where it first goes negative
# --------------------------------------------------------------------------------------------------------------

def men_B(m, dim: int, base: float) -> np.ndarray:
    """B_{m,theta} = sum_{i=0}^{d/2-1} cos(m theta_i) (Men et al. 2024, Theorem 1): the long-term decay of the
    ability to attend more to similar tokens than to random ones. Vectorised over m; float64 (B is too
    sensitive for float32)."""
    theta = rope_inv_freq(dim, base).numpy()
    return np.cos(np.asarray(m, dtype=np.float64)[..., None] * theta).sum(-1)


def _B_range(theta: torch.Tensor, start: int, count: int, sin_weights: torch.Tensor | None = None):
    """B_m for m = start .. start+count-1, fast: with m = m0 + k, cos(m theta) = cos(k theta) cos(m0 theta)
    - sin(k theta) sin(m0 theta), so one (c, d) @ (d, J) product gives c*J values of B from c + J rows of
    cosines and sines. With ``sin_weights`` w (d/2,), also sum_i w_i sin(m theta_i) (sin(m theta) = sin(k theta)
    cos(m0 theta) + cos(k theta) sin(m0 theta)): a (2, count) tensor then. Float64; the difference from a
    direct sum grows like m, about 3e-10 at m = 1e6."""
    c = max(1, math.isqrt(count))
    k = torch.arange(c, dtype=torch.float64)[:, None] * theta[None, :]                   # (c, d/2)
    m0 = theta[:, None] * (start + c * torch.arange(-(-count // c), dtype=torch.float64))[None, :]  # (d/2, J)
    left = [torch.cat([k.cos(), -k.sin()], 1)]                                          # (c, d)
    if sin_weights is not None:
        left.append(torch.cat([k.sin(), k.cos()], 1) * sin_weights.repeat(2))           # (c, d)
    out = torch.cat(left) @ torch.cat([m0.cos(), m0.sin()])                             # (rows * c, J)
    out = out.view(len(left), c, -1).transpose(1, 2).reshape(len(left), -1)[:, :count]  # (rows, count), m order
    return out[0] if sin_weights is None else out


FIRST_CHUNK = 4096  # m per evaluation at first; doubled each time, so a base that fails early costs little


def _negative_B(theta: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(m, B_m) for every negative B_m of the first chunk of m in [0, max_len] that has one, or None if B_m >= 0
    throughout."""
    start, chunk = 0, FIRST_CHUNK
    while start <= max_len:
        count = min(chunk, max_len + 1 - start)
        B = _B_range(theta, start, count)
        negative = torch.nonzero(B < 0).flatten()
        if negative.numel():
            return start + negative, B[negative]
        start, chunk = start + count, chunk * 2
    return None


def first_negative_B(dim: int, base: float, max_len: int) -> int | None:
    """The smallest m in [0, max_len] with B_m < 0, or None."""
    found = _negative_B(rope_inv_freq(dim, base), max_len)
    return None if found is None else int(found[0][0])


def context_of_base(dim: int, base: float, max_len: int = 1 << 21) -> int:
    """L_theta = sup{L : B_m >= 0 for all m in [0, L]}, searched up to ``max_len`` (returned if never negative)."""
    first = first_negative_B(dim, base, max_len)
    return max_len if first is None else first - 1


def _direct_negatives(dim: int, base: float, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """As ``_negative_B`` for b = ``base``, by direct float64 sums of cos(m theta_i) (8192 m at a time): the
    check a base must pass before the scan calls it feasible."""
    theta = rope_inv_freq(dim, base)
    for start in range(0, length + 1, 8192):
        m = torch.arange(start, min(start + 8192, length + 1), dtype=torch.float64)
        B = torch.cos(m[:, None] * theta[None, :]).sum(1)                                 # (chunk,)
        negative = torch.nonzero(B < 0).flatten()
        if negative.numel():
            return start + negative, B[negative]
    return None


# --------------------------------------------------------------------------------------------------------------
# How far a value of B_m certifies its sign: a bound on its slope and curvature in ln b
# --------------------------------------------------------------------------------------------------------------

# The feasible set {b : B_m >= 0 for all m <= L} is not monotone in b: B oscillates, and feasible islands a
# fraction of a percent wide lie below the bulk (d=128, 128K: 4.87e6 works, most bases up to 8.2e6 do not), so
# neither bisection nor a fixed grid finds the smallest base. What makes a scan exact is a bound on how fast B
# moves with the base. With u = ln b, x_i = 2i/d, theta_i = e^(-u x_i) and the phase phi_i = m theta_i:
#     B_m(u)   = sum_i cos phi_i
#     B_m'(u)  = sum_i x_i phi_i sin phi_i                              (d phi_i / du = -x_i phi_i)
#     B_m''(u) = -sum_i x_i^2 (phi_i^2 cos phi_i + phi_i sin phi_i),
# so |B_m''| <= C_m(u) = sum_i x_i^2 (phi_i^2 + phi_i).
# phi_i falls as u grows (x_i >= 0), so C_m(u) bounds |B_m''| on all of [u, u + s]; on [u - s, u] the phases are
# at most phi_i e^s, so e^(2s) C_m(u) bounds it there. Taylor's theorem with the Lagrange remainder then gives
#     |B_m(u + s) - B_m(u) - s B_m'(u)| <= s^2 C / 2,
# both ways. So a value at distance g > 0 from 0 that moves towards 0 at the (signed) rate r keeps its sign while
# g - s r - s^2 C / 2 > 0: for s below the positive root ``_reach(g, r, C)``. A base with B_m < 0 is thereby
# infeasible on a whole interval beyond it, and one with all B_m > 0 feasible on an interval below it. The first-
# order term is signed (the sines of the phases mostly cancel), so these steps are far longer than those of the
# unsigned |B_m'| <= m sum_i x_i theta_i alone (about a tenth of the bases at 32K), and about 0.6 of the way to
# where B_m really changes sign (measured at 128K): a better bound would save little, better witnesses more.
# Margin: g is measured from ROUNDING, not 0, as the fast evaluation differs from a direct sum by up to ~3e-10.

ROUNDING = 1e-8
MAX_STEP = 0.01                     # in ln b; keeps e^(2s) <= e^0.02 in the bound below u
BELOW = math.exp(2 * MAX_STEP)      # the factor on C_m(u) that bounds |B''| on [u - MAX_STEP, u]


def _reach(g: torch.Tensor, r: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The positive root s of g - s r - s^2 C / 2 = 0 where g > 0 (0 where g <= 0), at most MAX_STEP: how far
    a value g from 0, approaching it at rate r with |acceleration| <= C, surely stays on its side. Written in
    the two forms that avoid cancellation for either sign of r."""
    root = torch.sqrt(r * r + 2 * C * g.clamp(min=0))
    s = torch.where(r >= 0, 2 * g / (r + root), (root - r) / C)
    return torch.where(g > 0, s.nan_to_num(nan=MAX_STEP, posinf=MAX_STEP).clamp(max=MAX_STEP), torch.zeros_like(s))


def _terms(m: torch.Tensor, x: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """B_m, B_m' and C_m of the bound above, at the given m (float64), by direct sums over the pairs."""
    phi = m[:, None] * theta[None, :]                                                    # (len(m), d/2)
    return phi.cos().sum(1), (x * phi * phi.sin()).sum(1), (x * x * (phi * phi + phi)).sum(1)


def _reach_up(B, dB, C):
    """How far above u each B_m < 0 (of ``_terms``) surely stays negative."""
    return _reach(-(B + ROUNDING), dB, C)


def _reach_down(B, dB, C):
    """How far below u each B_m < 0 surely stays negative."""
    return _reach(-(B + ROUNDING), -dB, BELOW * C)


# --------------------------------------------------------------------------------------------------------------
# The certified scan
# --------------------------------------------------------------------------------------------------------------

# The scan walks up in u = ln b. At each base it needs one witness, an m <= L with B_m < 0, whose reach up is the
# step: every base skipped is then proven infeasible. Finding a witness from scratch means evaluating B_m for m
# from 0 until the first negative, O(L d) near the answer, so the witnesses of the last search are kept (WITNESSES
# of them, those with the most room by the first-order guess -B_m / m) and tried first: a witness usually stays
# negative for several steps, and trying it costs O(d). A fresh search is made when the kept ones' best step has
# fallen below POOL_ENOUGH of what the last search gave. Only where the best reach is below ``resolution`` does
# the scan step by ``resolution`` unproven; at the next base, a witness that reaches back over that gap closes it,
# and a gap left open is the only place (at most ``resolution`` wide in ln b) an island can hide. A base with no
# negative B_m in the fast evaluation is checked by direct sums before it is called feasible.

MEN_RESOLUTION = 1e-7
WITNESSES = 64
POOL_ENOUGH = 0.25


@dataclass(frozen=True)
class Scan:
    """What ``min_base_scan`` found: ``base`` reaches the length (direct sums); every base from the start up to
    ``infeasible_below`` is proven not to, except in ``open_gaps`` gaps at most the resolution wide; ``bases``
    were evaluated."""
    base: float
    infeasible_below: float
    open_gaps: int
    bases: int


def min_base_scan(dim: int, length: int, start: float = 1.0, resolution: float = MEN_RESOLUTION,
                  max_base: float = 1e12) -> Scan:
    """The certified scan above, from ``start`` (default 1: every base above 1 is covered) up to the first
    base that reaches ``length``."""
    x = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    u, end = math.log(start), math.log(max_base)
    covered = u                              # [ln start, covered) is proven infeasible
    pool, fresh = None, math.inf             # kept witnesses; the best step of the last search
    gaps = bases = 0
    while u <= end:
        bases += 1
        theta = torch.exp(-u * x)
        best = float(_reach_up(*_terms(pool, x, theta)).max()) if pool is not None else 0.0
        gap = u > covered
        if gap or best < POOL_ENOUGH * fresh:
            found = _negative_B(theta, length)
            if found is None:
                found = _direct_negatives(dim, math.exp(u), length)
            if found is None:        # the infimum lies in [covered, u]: no island is left to hide there
                return Scan(math.exp(u), math.exp(covered), gaps, bases)
            m, B = found             # m >= 1: B_0 = d/2
            S = (x * theta).sum()    # the first-order guess of a witness's room: -B_m / (m S)
            picked = m[torch.topk(-B / (m * S), min(WITNESSES, m.numel())).indices]
            pool = picked.double() if pool is None or not gap else torch.cat([picked.double(), pool]).unique()
            terms = _terms(pool, x, theta)
            fresh = float(_reach_up(*terms).max())
            best = max(best, fresh)
            if gap and u - float(_reach_down(*terms).max()) > covered:
                gaps += 1
        covered = u + best
        u = covered if best >= resolution else u + resolution
    raise RopeliteError(f"no base below {max_base:g} reaches {length} tokens at d={dim}")


def min_base_for_context(dim: int, length: int, start: float = 1.0, resolution: float = MEN_RESOLUTION,
                         max_base: float = 1e12) -> float:
    """The smallest base b with B_m >= 0 for all m <= length (Men et al.'s lower bound of the base), by the
    certified scan: every base from ``start`` to the answer is proven infeasible except in open gaps at most
    ``resolution`` wide (relative, in b), the answer is feasible by direct float64 sums, and the true infimum
    is at most ``resolution`` below it."""
    return min_base_scan(dim, length, start, resolution, max_base).base


def bulk_base_for_context(dim: int, length: int, start: float, stop: float,
                          resolution: float = MEN_RESOLUTION) -> float | None:
    """The smallest base b_bulk >= ``start`` such that every base in [b_bulk, ``stop``] reaches ``length``, or
    None if ``stop`` itself does not. Walks down from ``stop``: at each feasible base every B_m, m = 1..L, is
    at least ROUNDING, and the smallest reach down over m (the bound above) is the step, so the walk is
    certified except across steps of ``resolution`` where some B_m is within a hair of 0. The answer is the
    lowest base the walk found feasible before its first infeasible one (``start`` if it never met one)."""
    x = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    m = torch.arange(1, length + 1, dtype=torch.float64)
    u, low, lowest = math.log(stop), math.log(start), None
    while u >= low:
        theta = torch.exp(-u * x)
        B, sines = _B_range(theta, 1, length, sin_weights=x * theta)         # B_m and sum_i x_i theta_i sin phi_i
        if bool((B < 0).any()):
            return lowest
        lowest = math.exp(u)
        C = m * m * (x * x * theta * theta).sum() + m * (x * x * theta).sum()  # C_m(u) of the bound, per m
        step = float(_reach(B - ROUNDING, m * sines, BELOW * C).min())
        u -= max(step, resolution)
    return start


# --------------------------------------------------------------------------------------------------------------
# The table: ours beside the paper's, and how far known models' bases reach
# --------------------------------------------------------------------------------------------------------------

# Men et al. 2024, their table of lower bounds of the base (d = 128), as printed (two digits).
PAPER_BASES_D128 = {1024: 4.3e3, 2048: 1.6e4, 4096: 2.7e4, 8192: 8.4e4, 16384: 3.1e5, 32768: 6.4e5,
                    65536: 2.1e6, 131072: 7.8e6, 262144: 3.6e7, 524288: 6.4e7, 1048576: 5.1e8}

DEFINITIONS = {
    "B_m": "sum_{i<d/2} cos(m b^(-2i/d)) (Men et al. 2024, Theorem 1)",
    "min_base": "smallest base with B_m >= 0 for all m <= length (checked by direct float64 sums), by a scan up "
                "from b = 1 whose every step is certified by a bound on B's slope and curvature in ln b",
    "infeasible_below": "every base from 1 up to this one is proven to have some B_m < 0, m <= length (outside "
                        "open_gaps): the true infimum lies in [infeasible_below, min_base]",
    "open_gaps": "steps of relative width <= resolution the scan could not certify (where an island could hide)",
    "bulk_base": "smallest base above which every base up to bulk_up_to * min_base reaches the length, by a "
                 "certified walk down from there (null: that top base itself does not)",
    "*_context": "largest L with B_m >= 0 for all m <= L, searched up to 2 * length",
    "paper_base_reaches": "the printed base satisfies B_m >= 0 for all m <= length",
    "context_reached": "largest L with B_m >= 0 for all m <= L, searched up to 2^22"}


def bound_row(dim: int, length: int, resolution: float = MEN_RESOLUTION, bulk_up_to: float = 1.5) -> dict:
    """One row of the table (keys: DEFINITIONS): our smallest base and bulk, the paper's printed base (d = 128)
    and whether it satisfies its own criterion, and the contexts both reach (searched up to 2 * length)."""
    scan = min_base_scan(dim, length, resolution=resolution)
    found = scan.base
    bulk = bulk_base_for_context(dim, length, found, found * bulk_up_to, resolution)
    row = {"length": length, "dim": dim, "resolution": resolution, "bulk_up_to": bulk_up_to, "min_base": found,
           "infeasible_below": scan.infeasible_below, "open_gaps": scan.open_gaps, "bulk_base": bulk,
           "min_base_context": context_of_base(dim, found, 2 * length)}
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
        numbers.append({k: r[k] for k in ("length", "dim", "min_base", "infeasible_below", "open_gaps",
                                          "bulk_base", "paper_base", "paper_base_reaches", "paper_base_context")})
    printed = [r for r in rows if r["paper_base"] is not None]
    if printed:
        fails = sum(not r["paper_base_reaches"] for r in printed)
        finding.append(f"The paper's printed base fails its own criterion at {fails} of the {len(printed)} "
                       "lengths it prints (exact: certified scans and direct sums, no sampling).")
    return "Men et al.'s lower bound of the base per context length", CLAIM, finding, {"rows": numbers}
