"""Checks for the exercises of the tour (docs/tour.md): a learner's function against ropelite's own on many seeded
random inputs.

    from ropelite.exercises import check_pi
    print(check_pi(my_pi_inv_freq))     # my_pi_inv_freq(dim, base, factor) -> theta'_i, one per pair

Each check returns a ``Verdict``: it passed, or the first input where the two differ, the value expected and the
value got there, and a hint when the difference is that of a known mistake (PI without the 1/s, YaRN without its
temperature, entropy in bits, ...). The mistakes are recognised by computing them on that input; the checks hold
no solution beyond ropelite's own functions, which they call.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .bound import men_B
from .rope import (apply_rope, apply_rope_adjacent, ntk_inv_freq, pi_inv_freq, rope_cos_sin, rope_inv_freq,
                   yarn_inv_freq, yarn_mscale, yarn_ramp)
from .stats import entropy

CASES = 200  # random inputs per check


@dataclass(frozen=True)
class Verdict:
    """What a check found. ``case`` holds the input of the first difference (argument name -> value), so
    ``fn(*verdict.case.values())`` reproduces it; ``expected`` and ``got`` are the whole outputs there."""

    passed: bool
    message: str
    case: dict | None = None
    expected: object = None
    got: object = None
    hint: str | None = None

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return self.message

    __repr__ = __str__


@dataclass(frozen=True)
class Exercise:
    """One exercise: ropelite's function, how to draw a random input for it, the tolerance, the output's parts
    (a frequency vector; YaRN's frequencies and attention factor) and the mistakes it recognises."""

    check: str                           # the check's name, as the learner calls it
    signature: str                       # the learner's function, in words (said when it fails to run or its output
    #                                      has the wrong shape)
    reference: Callable                  # ropelite's own, taking the same arguments
    reference_name: str
    draw: Callable[[np.random.Generator], dict]   # one random input: argument name -> value, in call order
    parts: tuple[tuple[str, tuple[str, ...]], ...]  # per part of the output: its name, what each index counts
    rtol: float
    atol: float
    mistakes: tuple[tuple[str, Callable], ...]    # (hint, a function making that mistake)
    near: tuple[tuple[str, Callable[[dict], float]], ...] = ()  # (hint, the largest error a mistake of precision
    #                                                               makes on this input): for a miss that close


def _array(value) -> np.ndarray:
    """A learner's output part as a float64 array (tensor, array, list or number)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def _split(out, parts: int) -> list:
    """The output's parts: a tuple of ``parts`` values, or one value."""
    if parts == 1:
        return [out]
    if not isinstance(out, (tuple, list)) or len(out) != parts:
        raise TypeError(f"return {parts} values (a tuple)")
    return list(out)


def _difference(ex: Exercise, expected, got) -> str | None:
    """Where ``got`` first differs from ``expected`` (None: it does not), as 'at pair i=3: expected 0.1, got 0.4'."""
    try:
        got_parts = [_array(g) for g in _split(got, len(ex.parts))]
    except (TypeError, ValueError) as e:
        return f"the output is not the right kind: {e}"
    for (name, index), want, have in zip(ex.parts, [_array(e) for e in _split(expected, len(ex.parts))], got_parts):
        label = f"{name} " if len(ex.parts) > 1 else ""
        if want.shape != have.shape:
            per = f" (one per {index[0]})" if want.ndim == 1 else ""
            return f"{label}has shape {have.shape}, expected {want.shape}{per}"
        bad = ~np.isclose(have, want, rtol=ex.rtol, atol=ex.atol)
        if bad.any():
            at = np.unravel_index(int(np.flatnonzero(bad)[0]), want.shape)
            where = "".join(f"{', ' * (j > 0)}{word}={k}" for j, (word, k) in enumerate(zip(index, at)))
            return f"{label}{'at ' + where + ': ' if where else ''}expected {want[at]:.6g}, got {have[at]:.6g}"
    return None


def _same(ex: Exercise, a, b) -> bool:
    """a and b agree within the tolerance (NaN equal to NaN: a mistake may make NaNs)."""
    try:
        pa, pb = _split(a, len(ex.parts)), _split(b, len(ex.parts))
        return all(_array(x).shape == _array(y).shape
                   and np.allclose(_array(x), _array(y), rtol=ex.rtol, atol=ex.atol, equal_nan=True)
                   for x, y in zip(pa, pb))
    except (TypeError, ValueError):
        return False


def _within(expected, got, atol: float) -> bool:
    """|got - expected| <= atol everywhere (one-part outputs)."""
    try:
        return bool(np.allclose(_array(got), _array(expected), rtol=0, atol=atol))
    except (TypeError, ValueError):
        return False


def _describe(case: dict) -> str:
    """The input in words: numbers as numbers, tensors by shape (and their few values when short)."""
    words = []
    for name, value in case.items():
        if isinstance(value, torch.Tensor) and name == "p":
            words.append(f"p: {value.numel()} probabilities, {int((value == 0).sum())} of them 0")
        elif isinstance(value, torch.Tensor):
            shown = value.tolist() if value.numel() <= 8 and not value.is_floating_point() else tuple(value.shape)
            words.append(f"{name}: {'shape ' * isinstance(shown, tuple)}{shown}")
        elif isinstance(value, float):
            words.append(f"{name}={value:.6g}")
        else:
            words.append(f"{name}={value}")
    return ", ".join(words)


def _hint(ex: Exercise, case: dict, expected, got) -> str | None:
    """The hint of the first known mistake whose output on ``case`` is what the learner got, if any."""
    for text, mistake in ex.mistakes:
        try:
            if _same(ex, mistake(*_fresh(case).values()), got):
                return text
        except Exception:  # noqa: BLE001 -- a mistake that cannot run on this input is not the one made
            continue
    for text, error in ex.near:
        if _within(expected, got, error(case)):
            return text
    return None


def _fresh(case: dict) -> dict:
    """A copy of the input for one call, so that a function that writes into its arguments changes nothing else."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def check(ex: Exercise, fn: Callable, cases: int = CASES, seed: int = 0) -> Verdict:
    """Run ``fn`` and ropelite's function on ``cases`` random inputs (the same ones for a given seed) and report
    the first where they differ."""
    name = getattr(fn, "__name__", repr(fn))
    rng = np.random.default_rng(seed)
    for n in range(1, cases + 1):
        case = ex.draw(rng)
        expected = ex.reference(*_fresh(case).values())
        where = f"on random input {n} of {cases}: {_describe(case)}"
        try:
            got = fn(*_fresh(case).values())
        except Exception as e:  # noqa: BLE001 -- a learner's function may fail in any way; say how, and where
            return Verdict(False, f"{ex.check}: {name} raised {type(e).__name__}: {e}\n  {where}\n"
                                  f"  (the check calls {ex.signature})", case, expected)
        diff = _difference(ex, expected, got)
        if diff is not None:
            if "has shape" in diff or diff.startswith("the output is not"):   # a matter of form: say the form
                diff += f"\n  (the check calls {ex.signature})"
            hint = _hint(ex, case, expected, got)
            message = (f"{ex.check}: {name} differs from {ex.reference_name}\n  {where}\n  {diff}"
                       + ("\n" + textwrap.fill(f"hint: {hint}", 110, initial_indent="  ", subsequent_indent="    ")
                          if hint else ""))
            return Verdict(False, message, case, expected, got, hint)
    return Verdict(True, f"{ex.check}: {name} matches {ex.reference_name} on {cases} random inputs "
                         f"(rtol {ex.rtol:g}, atol {ex.atol:g})")


# --------------------------------------------------------------------------------------------------------------
# Random inputs
# --------------------------------------------------------------------------------------------------------------

def _dim(rng, low: int = 2, high: int = 256) -> int:
    return 2 * int(rng.integers(low // 2, high // 2 + 1))


def _log_uniform(rng, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _scaling(rng, low_dim: int = 2) -> dict:
    """(dim, base, factor) for the frequency exercises; factors from 1.5 up, where every mistake shows."""
    return {"dim": _dim(rng, low_dim), "base": _log_uniform(rng, 10, 1e7), "factor": float(rng.uniform(1.5, 64))}


def _rotation_case(rng) -> dict:
    T, d = int(rng.integers(1, 9)), _dim(rng, 2, 64)
    return {"x": torch.from_numpy(rng.standard_normal((T, d))),                     # (T, d) float64
            "positions": torch.from_numpy(rng.integers(0, 1024, T)),                 # (T,) int64
            "base": _log_uniform(rng, 100, 1e6)}


def _yarn_case(rng) -> dict:
    return {**_scaling(rng, 8), "base": _log_uniform(rng, 1e3, 1e7),
            "original_max": 2 ** int(rng.integers(9, 18))}


def _distribution(rng) -> torch.Tensor:
    """A probability vector of 1..1000 entries: Dirichlet-drawn (from near one-hot to near uniform), a third of them
    with entries set to exactly 0, a few uniform."""
    n = int(rng.integers(1, 1001))
    if rng.random() < 0.05:
        return torch.full((n,), 1 / n, dtype=torch.float64)
    p = rng.dirichlet(np.full(n, _log_uniform(rng, 0.01, 10)))
    if rng.random() < 1 / 3 and n > 1:
        p[rng.random(n) < rng.uniform(0.1, 0.9)] = 0
        if p.sum() == 0:
            p[0] = 1
    return torch.from_numpy(p / p.sum())


def _B_case(rng) -> dict:
    m = int(rng.integers(0, 1 << 17)) if rng.random() < 0.7 else int(rng.integers(0, 1024))
    return {"m": m, "dim": _dim(rng), "base": _log_uniform(rng, 10, 1e8)}


# --------------------------------------------------------------------------------------------------------------
# The exercises and the mistakes each recognises
# --------------------------------------------------------------------------------------------------------------

def _rotate(x, positions, base, inv_freq=None, apply=apply_rope_adjacent):
    """ropelite's rotation of x (T, d) at ``positions``; the mistakes swap in other frequencies or the other layout."""
    theta = rope_inv_freq(x.shape[-1], base) if inv_freq is None else inv_freq
    return apply(x, *rope_cos_sin(theta, positions))


def _pairs_exponent(dim: int, base: float) -> torch.Tensor:
    """theta_i = b^(-i/d): the exponent without its 2."""
    return base ** (-torch.arange(dim // 2, dtype=torch.float64) / dim)


ROTATION = Exercise(
    "check_rotation", "fn(x, positions, base) -> x rotated, adjacent pairs (seed paper Eq. 1); x (T, d)",
    lambda x, positions, base: _rotate(x, positions, base), "ropelite.rope.apply_rope_adjacent",
    _rotation_case, (("output", ("token t", "dim j")),), rtol=1e-4, atol=1e-3,
    mistakes=(
        ("this is Hugging Face's halves layout (pairs h_i, h_i+d/2): Eq. 1 turns adjacent pairs (h_2i, h_2i+1)",
         lambda x, positions, base: _rotate(x, positions, base, apply=apply_rope)),
        ("it turns the other way (the sign of the sin terms): Eq. 1 gives "
         "(h_2i cos - h_2i+1 sin, h_2i+1 cos + h_2i sin)",
         lambda x, positions, base: _rotate(x, -positions, base)),
        ("theta_i = b^(-2i/d): i counts pairs, so the exponent is 2i/d",
         lambda x, positions, base: _rotate(x, positions, base, _pairs_exponent(x.shape[-1], base))),
        ("x comes back unturned: pair i at position m turns by the angle m * theta_i",
         lambda x, positions, base: x),
    ))

PI = Exercise(
    "check_pi", "fn(dim, base, factor) -> theta'_i of Position Interpolation, d/2 values",
    pi_inv_freq, "ropelite.rope.pi_inv_freq", _scaling, (("theta'", ("pair i",)),), rtol=1e-5, atol=1e-12,
    mistakes=(
        ("PI without the 1/s: these are plain RoPE's theta_i. PI maps position m to m/s, which divides every "
         "theta_i by s", lambda dim, base, factor: rope_inv_freq(dim, base)),
        ("multiplied by s: PI divides theta_i by s (positions m -> m/s turn slower)",
         lambda dim, base, factor: rope_inv_freq(dim, base) * factor),
        ("the base multiplied by s changes each pair by a different amount (a base change, NTK's idea): PI divides "
         "every theta_i by the same s", lambda dim, base, factor: rope_inv_freq(dim, base * factor)),
        ("theta_i = b^(-2i/d): i counts pairs, so the exponent is 2i/d",
         lambda dim, base, factor: _pairs_exponent(dim, base) / factor),
    ))

NTK = Exercise(
    "check_ntk", "fn(dim, base, factor) -> theta'_i of NTK-aware scaling, d/2 values",
    ntk_inv_freq, "ropelite.rope.ntk_inv_freq",
    lambda rng: _scaling(rng, 4), (("theta'", ("pair i",)),), rtol=1e-5, atol=1e-12,
    mistakes=(
        ("the base times s, without the exponent: b' = b * s^(d/(d-2)) makes the slowest pair turn exactly s times "
         "slower", lambda dim, base, factor: rope_inv_freq(dim, base * factor)),
        ("the exponent is upside down: b' = b * s^(d/(d-2))",
         lambda dim, base, factor: rope_inv_freq(dim, base * factor ** ((dim - 2) / dim))),
        ("this is PI (every theta_i / s): NTK changes the base instead, b' = b * s^(d/(d-2))", pi_inv_freq),
        ("the base is unchanged: NTK replaces b by b' = b * s^(d/(d-2))",
         lambda dim, base, factor: rope_inv_freq(dim, base)),
    ))


def _yarn_parts(dim, base, factor, original_max, ramp_backwards=False, truncate=True):
    theta, ramp = rope_inv_freq(dim, base), yarn_ramp(dim, base, original_max, truncate=truncate)
    if ramp_backwards:
        ramp = 1 - ramp
    return theta / factor * ramp + theta * (1 - ramp)


YARN = Exercise(
    "check_yarn", "fn(dim, base, factor, original_max) -> (theta'_i, attention factor on cos and sin)",
    lambda dim, base, factor, original_max: (yarn_inv_freq(dim, base, factor, original_max), yarn_mscale(factor)),
    "ropelite.rope.yarn_inv_freq and yarn_attention_factor", _yarn_case,
    (("theta'", ("pair i",)), ("attention factor", ())), rtol=1e-5, atol=1e-12,
    mistakes=(
        ("YaRN without the temperature: the attention factor on cos and sin is sqrt(1/t) = 0.1 ln s + 1 "
         "(YaRN paper Eq. 22), not 1",
         lambda dim, base, factor, original_max: (yarn_inv_freq(dim, base, factor, original_max), 1.0)),
        ("that is the factor on the logits (0.1 ln s + 1)^2: cos and sin each take 0.1 ln s + 1, and q.k gets its "
         "square", lambda dim, base, factor, original_max: (yarn_inv_freq(dim, base, factor, original_max),
                                                          yarn_mscale(factor) ** 2)),
        ("every pair is interpolated like PI: the ramp keeps the fast pairs (many turns within L) as RoPE",
         lambda dim, base, factor, original_max: (pi_inv_freq(dim, base, factor), yarn_mscale(factor))),
        ("the ramp is backwards: gamma_i = 0 (fast pairs, low i) keeps theta_i, gamma_i = 1 (slow pairs) divides "
         "by s", lambda dim, base, factor, original_max: (_yarn_parts(dim, base, factor, original_max, True),
                                                        yarn_mscale(factor))),
        ("the correction dims are not rounded: low = floor(.), high = ceil(.) in the code form checkpoints use",
         lambda dim, base, factor, original_max: (_yarn_parts(dim, base, factor, original_max, truncate=False),
                                                  yarn_mscale(factor))),
    ))

ENTROPY = Exercise(
    "check_entropy", "fn(p) -> H(p) = -sum p ln p in nats; p a 1-D float64 tensor summing to 1",
    lambda p: float(entropy(p)), "ropelite.stats.entropy", lambda rng: {"p": _distribution(rng)},
    (("entropy", ()),), rtol=1e-6, atol=1e-9,
    mistakes=(
        ("entropy in bits (log base 2): Algorithm 1 and ropelite use the natural log, nats = bits * ln 2",
         lambda p: float(entropy(p)) / math.log(2)),
        ("log base 10: the entropy is in nats, with the natural log",
         lambda p: float(entropy(p)) / math.log(10)),
        ("the sign: H = -sum p ln p, which is >= 0", lambda p: -float(entropy(p))),
        ("0 ln 0 is NaN in floating point: take it as 0 (skip the p = 0 terms), as Algorithm 1 does",
         lambda p: float(-(p * p.log()).sum())),
        ("divided by ln n: that is the entropy relative to uniform attention; Algorithm 1 takes it as it is",
         lambda p: float(entropy(p)) / math.log(len(p))),
    ))

BOUND = Exercise(
    "check_B", "fn(m, dim, base) -> B_m = sum over pairs i < d/2 of cos(m theta_i), theta_i = b^(-2i/d)",
    lambda m, dim, base: float(men_B(m, dim, base)), "ropelite.bound.men_B", _B_case, (("B_m", ()),),
    rtol=1e-7, atol=1e-7,
    mistakes=(
        ("theta_i = b^(-2i/d): i counts pairs, so the exponent is 2i/d",
         lambda m, dim, base: float(torch.cos(m * _pairs_exponent(dim, base)).sum())),
        ("d/2 terms, one per pair: i runs over 0 .. d/2 - 1",
         lambda m, dim, base: float(torch.cos(m * base ** (-2 * torch.arange(dim, dtype=torch.float64) / dim)).sum())),
        ("one cos per pair: each pair is counted twice here (d terms)",
         lambda m, dim, base: 2 * float(men_B(m, dim, base))),
        ("B_m sums cos(m theta_i), not sin",
         lambda m, dim, base: float(torch.sin(m * rope_inv_freq(dim, base)).sum())),
        ("a sum over the d/2 pairs, not a mean", lambda m, dim, base: float(men_B(m, dim, base)) / (dim // 2)),
    ),
    # float32 rounds theta_i and each angle m theta_i to 2^-24 relative: up to ~3 m theta_i 2^-24 per term
    near=(("close, but float32 is not enough: the angles m * theta_i lose precision as m grows (the fastest pair "
           "turns m radians); form theta_i and the angles in float64",
           lambda case: 3 * case["m"] * float(rope_inv_freq(case["dim"], case["base"]).sum()) * 2.0 ** -24 + 1e-5),))


def check_rotation(fn: Callable, cases: int = CASES, seed: int = 0) -> Verdict:
    """fn(x, positions, base) -> x (T, d) with pair (2i, 2i+1) of row t turned by positions[t] * b^(-2i/d) (the seed
    paper's Eq. 1), against ``rope.apply_rope_adjacent``. x is float64, positions int64."""
    return check(ROTATION, fn, cases, seed)


def check_pi(fn: Callable, cases: int = CASES, seed: int = 0) -> Verdict:
    """fn(dim, base, factor) -> Position Interpolation's d/2 frequencies theta'_i, against ``rope.pi_inv_freq``."""
    return check(PI, fn, cases, seed)


def check_ntk(fn: Callable, cases: int = CASES, seed: int = 0) -> Verdict:
    """fn(dim, base, factor) -> NTK-aware frequencies (the base b * s^(d/(d-2)); YaRN paper Eq. 16), against
    ``rope.ntk_inv_freq``."""
    return check(NTK, fn, cases, seed)


def check_yarn(fn: Callable, cases: int = CASES, seed: int = 0) -> Verdict:
    """fn(dim, base, factor, original_max) -> (theta'_i, attention factor on cos and sin) of YaRN with its default
    beta_fast = 32, beta_slow = 1, in the code form (ramp linear in the pair index), against ``rope.yarn_inv_freq``
    and ``rope.yarn_attention_factor``."""
    return check(YARN, fn, cases, seed)


def check_entropy(fn: Callable, cases: int = CASES, seed: int = 0) -> Verdict:
    """fn(p) -> the entropy of p in nats (a number), against ``stats.entropy``; inputs include exact zeros."""
    return check(ENTROPY, fn, cases, seed)


def check_B(fn: Callable, cases: int = CASES, seed: int = 0) -> Verdict:
    """fn(m, dim, base) -> Men et al.'s B_m (a number), against ``bound.men_B``; m up to 2^17."""
    return check(BOUND, fn, cases, seed)
