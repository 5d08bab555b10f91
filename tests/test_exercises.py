"""The exercise checks (ropelite.exercises): ropelite's own functions pass, in any output form a learner may
return; each deliberate mistake is caught with a message that says on which input, at which index, the value
expected and the value got, and the hint of that mistake; a difference no hint knows is still located."""

import math

import numpy as np
import pytest
import torch

from ropelite import bound, exercises, rope, stats
from ropelite.exercises import check_B, check_entropy, check_ntk, check_pi, check_rotation, check_yarn


def rotate(x, positions, base):
    return rope.apply_rope_adjacent(x, *rope.rope_cos_sin(rope.rope_inv_freq(x.shape[-1], base), positions))


def yarn(dim, base, factor, original_max):
    return rope.yarn_inv_freq(dim, base, factor, original_max), rope.yarn_attention_factor(factor)


CORRECT = [
    (check_rotation, rotate),
    (check_rotation, lambda x, positions, base: rotate(x, positions, base).numpy()),      # numpy out
    (check_pi, rope.pi_inv_freq),
    (check_pi, lambda d, b, s: rope.pi_inv_freq(d, b, s).float().tolist()),              # float32, a list
    (check_ntk, rope.ntk_inv_freq),
    (check_yarn, yarn),
    (check_yarn, lambda *a: [x.tolist() if torch.is_tensor(x) else x for x in yarn(*a)]),  # a list of parts
    (check_entropy, stats.entropy),                                                      # a 0-d tensor
    (check_entropy, lambda p: float(stats.entropy(p.float()))),                          # float32 inside
    (check_B, bound.men_B),
]


@pytest.mark.parametrize("check, fn", CORRECT)
def test_ropelite_itself_passes(check, fn):
    verdict = check(fn)
    assert verdict.passed and bool(verdict), verdict.message
    assert "matches" in verdict.message and "200 random inputs" in verdict.message


def pi_without_the_1_over_s(dim, base, factor):
    return rope.rope_inv_freq(dim, base)


def yarn_without_temperature(dim, base, factor, original_max):
    return rope.yarn_inv_freq(dim, base, factor, original_max), 1.0


def entropy_in_bits(p):
    return float(stats.entropy(p)) / math.log(2)


def B_wrong_exponent(m, dim, base):
    theta = base ** (-torch.arange(dim // 2, dtype=torch.float64) / dim)   # b^(-i/d): the 2 is missing
    return float(torch.cos(m * theta).sum())


MISTAKES = [
    (check_pi, pi_without_the_1_over_s, "PI without the 1/s"),
    (check_pi, lambda d, b, s: rope.rope_inv_freq(d, b) * s, "multiplied by s"),
    (check_ntk, lambda d, b, s: rope.rope_inv_freq(d, b * s), "without the exponent"),
    (check_ntk, rope.pi_inv_freq, "this is PI"),
    (check_yarn, yarn_without_temperature, "YaRN without the temperature"),
    (check_yarn, lambda *a: (yarn(*a)[0], yarn(*a)[1] ** 2), "factor on the logits"),
    (check_yarn, lambda d, b, s, L: (rope.pi_inv_freq(d, b, s), rope.yarn_attention_factor(s)), "like PI"),
    (check_yarn, lambda d, b, s, L: (rope.yarn_inv_freq(d, b, s, L, truncate=False), rope.yarn_attention_factor(s)),
     "not rounded"),
    (check_entropy, entropy_in_bits, "entropy in bits"),
    (check_entropy, lambda p: float((p * p.log()).sum()), "0 ln 0"),        # NaN where p = 0 comes first
    (check_entropy, lambda p: -float(stats.entropy(p)), "the sign"),
    (check_B, B_wrong_exponent, "the exponent is 2i/d"),
    (check_B, lambda m, d, b: float(torch.sin(m * rope.rope_inv_freq(d, b)).sum()), "not sin"),
    (check_B, lambda m, d, b: float(torch.cos(m * b ** (-torch.arange(0, d, 2) / d)).sum()), "float32"),
    (check_rotation, lambda x, positions, base: rope.apply_rope(x, *rope.rope_cos_sin(
        rope.rope_inv_freq(x.shape[-1], base), positions)), "halves layout"),
    (check_rotation, lambda x, positions, base: rotate(x, -positions, base), "the other way"),
    (check_rotation, lambda x, positions, base: x, "unturned"),
    (check_rotation, lambda x, positions, base: rope.apply_rope_adjacent(x, *rope.rope_cos_sin(
        base ** (-torch.arange(x.shape[-1] // 2, dtype=torch.float64) / x.shape[-1]), positions)), "2i/d"),
    (check_pi, lambda d, b, s: rope.rope_inv_freq(d, b * s), "same s"),
    (check_pi, lambda d, b, s: b ** (-torch.arange(d // 2, dtype=torch.float64) / d) / s, "2i/d"),
    (check_ntk, lambda d, b, s: rope.rope_inv_freq(d, b * s ** ((d - 2) / d)), "upside down"),
    (check_ntk, lambda d, b, s: rope.rope_inv_freq(d, b), "base is unchanged"),
    (check_yarn, lambda d, b, s, L: (rope.rope_inv_freq(d, b) / s * (1 - rope.yarn_ramp(d, b, L))
                                     + rope.rope_inv_freq(d, b) * rope.yarn_ramp(d, b, L),
                                     rope.yarn_attention_factor(s)), "backwards"),
    (check_entropy, lambda p: float(stats.entropy(p)) / math.log(10), "log base 10"),
    (check_entropy, lambda p: float(stats.entropy(p)) / math.log(len(p)), "divided by ln n"),
    (check_B, lambda m, d, b: float(torch.cos(m * b ** (-2 * torch.arange(d, dtype=torch.float64) / d)).sum()),
     "d/2 terms"),
    (check_B, lambda m, d, b: float(torch.cos(m * rope.rope_inv_freq(d, b)).repeat(2).sum()), "counted twice"),
    (check_B, lambda m, d, b: float(torch.cos(m * rope.rope_inv_freq(d, b)).mean()), "not a mean"),
]


@pytest.mark.parametrize("check, fn, hint", MISTAKES)
def test_a_mistake_is_caught_with_its_hint(check, fn, hint):
    verdict = check(fn)
    assert not verdict.passed and not verdict
    assert hint in verdict.hint and hint in verdict.message
    assert "on random input" in verdict.message and "of 200" in verdict.message
    assert "expected" in verdict.message and "got" in verdict.message
    # the verdict's input reproduces what it reports: the same output again, and ropelite's differs from it
    again = fn(*verdict.case.values())
    assert np.allclose(flat(again), flat(verdict.got), equal_nan=True)
    assert np.allclose(flat(verdict.expected), flat(EXERCISE[check].reference(*verdict.case.values())))
    assert flat(again).shape != flat(verdict.expected).shape or not np.allclose(
        flat(again), flat(verdict.expected), rtol=1e-5, atol=1e-12)


EXERCISE = {check_rotation: exercises.ROTATION, check_pi: exercises.PI, check_ntk: exercises.NTK,
            check_yarn: exercises.YARN, check_entropy: exercises.ENTROPY, check_B: exercises.BOUND}


def flat(out) -> np.ndarray:
    """An output as one float64 vector (YaRN's two parts one after the other)."""
    parts = out if isinstance(out, tuple) else (out,)
    return np.concatenate([np.ravel(np.asarray(p.double() if torch.is_tensor(p) else p, dtype=float)) for p in parts])


def test_pi_without_the_1_over_s_says_where_with_the_right_numbers():
    verdict = check_pi(pi_without_the_1_over_s)
    dim, base, factor = verdict.case.values()
    assert f"dim={dim}, base={base:.6g}, factor={factor:.6g}" in verdict.message
    # pair 0: theta_0 = 1 for every base, so PI's is 1/s and the mistake's 1
    assert f"at pair i=0: expected {1 / factor:.6g}, got 1" in verdict.message


def test_yarn_without_temperature_names_the_attention_factor():
    verdict = check_yarn(yarn_without_temperature)
    factor = verdict.case["factor"]
    assert f"attention factor expected {0.1 * math.log(factor) + 1:.6g}, got 1" in verdict.message


def test_the_first_differing_input_and_index_are_reported():
    """Right everywhere except the slowest pair, and only when d > 128: the check finds such an input and that
    pair, and gives no hint (no known mistake looks like it)."""
    def wrong_at_the_end(dim, base, factor):
        theta = rope.pi_inv_freq(dim, base, factor).clone()
        if dim > 128:
            theta[-1] *= 1.001
        return theta

    verdict = check_pi(wrong_at_the_end)
    assert not verdict.passed and verdict.hint is None and "hint" not in verdict.message
    assert verdict.case["dim"] > 128
    assert f"at pair i={verdict.case['dim'] // 2 - 1}:" in verdict.message
    # every earlier input passed: it is the first with d > 128
    rng = np.random.default_rng(0)
    first = next(n for n in range(1, 201) if exercises.PI.draw(rng)["dim"] > 128)
    assert f"random input {first} of 200" in verdict.message


def test_a_small_relative_error_is_caught():
    verdict = check_entropy(lambda p: float(stats.entropy(p)) * (1 + 1e-4))
    assert not verdict.passed and verdict.hint is None


def test_raising_and_wrong_shapes_are_reported():
    def unfinished(dim, base, factor):
        raise NotImplementedError("your code")

    verdict = check_pi(unfinished)
    assert not verdict.passed and "raised NotImplementedError: your code" in verdict.message
    assert "on random input 1 of 200: dim=" in verdict.message

    verdict = check_pi(lambda dim, base, factor: rope.pi_inv_freq(2 * dim, base, factor))   # d values, not d/2
    assert "has shape" in verdict.message and "one per pair i" in verdict.message
    verdict = check_yarn(lambda *a: yarn(*a)[0])                                            # no attention factor
    assert "return 2 values" in verdict.message


def test_writing_into_the_input_does_not_fool_the_check():
    """A correct function that then scribbles over its input passes (the check hands each call its own copy)."""
    def scribbles(x, positions, base):
        out = rotate(x, positions, base)
        x.zero_()
        positions.zero_()
        return out

    assert check_rotation(scribbles).passed


def test_the_inputs_are_seeded_and_varied():
    a, b = exercises.PI.draw(np.random.default_rng(5)), exercises.PI.draw(np.random.default_rng(5))
    assert a == b
    rng = np.random.default_rng(0)
    cases = [exercises.ENTROPY.draw(rng)["p"] for _ in range(200)]
    assert sum(bool((p == 0).any()) for p in cases) >= 30                 # exact zeros are exercised
    assert all(abs(float(p.sum()) - 1) < 1e-12 for p in cases)
    rng = np.random.default_rng(0)
    ms = [exercises.BOUND.draw(rng)["m"] for _ in range(200)]
    assert max(ms) > 1e5 and min(ms) < 1024                             # float32 shows only at large m
