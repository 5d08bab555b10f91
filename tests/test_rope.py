"""ropelite.rope against closed forms, the papers' equations and independent float64/complex re-derivations.

Nothing here compares the code with a number the code produced: every expected value is written out from the
formula (YaRN paper Eq. 16-22, seed paper Eq. 1, the Llama 3.1 piecewise rule)."""

import dataclasses
import math

import pytest
import torch

from ropelite.errors import RopeliteError
from ropelite.rope import (ROPE_TYPES, SETTINGS, VARIANTS, RopeConfig, adjacent_to_halves, apply_rope,
                           apply_rope_adjacent, dynamic_inv_freq, halves_to_adjacent, llama3_inv_freq,
                           longrope_attention_factor, longrope_inv_freq, ntk_base, ntk_inv_freq, pi_inv_freq,
                           rope_cos_sin, rope_inv_freq, yarn_attention_factor, yarn_inv_freq, yarn_ramp)


def theta_closed_form(d, b):
    """theta_i = b^(-2i/d), one Python float per pair (RoFormer; seed paper Eq. 1)."""
    return torch.tensor([b ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)


def close(a, b, rtol=1e-12, atol=0.0):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------------------
# Frequencies, each against its closed form
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,b", [(16, 1e4), (64, 1e5), (128, 5e5)])
def test_rope_theta_closed_form(d, b):
    theta = rope_inv_freq(d, b)
    assert theta.dtype == torch.float64 and theta.shape == (d // 2,)
    close(theta, theta_closed_form(d, b))
    assert theta[0] == 1.0  # the fastest pair turns one radian per token


@pytest.mark.parametrize("s", [2.0, 8.0])
def test_pi_divides_every_frequency(s):
    close(pi_inv_freq(64, 1e4, s), theta_closed_form(64, 1e4) / s)
    close(RopeConfig(type="pi", theta=1e4, factor=s).frequencies(64, 10)[0], theta_closed_form(64, 1e4) / s)


def test_ntk_aware_base():
    d, b, s = 128, 1e4, 4.0
    expected = 1e4 * 4.0 ** (128 / 126)               # YaRN paper Eq. 16
    assert ntk_base(d, b, s) == pytest.approx(expected, rel=1e-14)
    theta = ntk_inv_freq(d, b, s)
    close(theta, theta_closed_form(d, expected))
    # The exponent d/(d-2) is chosen so the slowest pair is interpolated by exactly s, the fastest not at all.
    assert theta[0] == 1.0
    assert float(theta[-1]) == pytest.approx(b ** (-(d - 2) / d) / s, rel=1e-12)
    close(RopeConfig(type="ntk", theta=b, factor=s).frequencies(d, 1)[0], theta_closed_form(d, expected))


def test_ntk_explicit_base():
    """The seed paper's NTK is a plain base change 1e4 -> 1e6 (Code Llama style)."""
    close(ntk_inv_freq(64, 1e4, new_base=1e6), theta_closed_form(64, 1e6))
    cfg = RopeConfig(type="ntk", theta=1e4, base=1e6)
    close(cfg.frequencies(64, 1)[0], theta_closed_form(64, 1e6))
    assert cfg.describe() == "ntk base 1e+06"
    with pytest.raises(RopeliteError, match="NTK"):
        RopeConfig(type="yarn", base=1e6)


def test_dynamic_is_rope_inside_L_and_the_formula_beyond():
    d, b, s, L = 64, 1e4, 2.0, 1024
    for seq_len in (1, 512, L):
        close(dynamic_inv_freq(d, b, s, L, seq_len), theta_closed_form(d, b))
    # l = 3L: b' = b (s*3 - (s-1))^(d/(d-2)) = b * 5^(64/62)
    close(dynamic_inv_freq(d, b, s, L, 3 * L), theta_closed_form(d, b * 5.0 ** (64 / 62)))
    cfg = RopeConfig(type="dynamic", theta=b, factor=s, original_max_position_embeddings=L)
    assert cfg.variant.length_dependent
    close(cfg.frequencies(d, L)[0], theta_closed_form(d, b))
    close(cfg.frequencies(d, L + 1)[0], theta_closed_form(d, b * (s * (L + 1) / L - 1) ** (64 / 62)))


def test_yarn_reference_numbers():
    """REFERENCE.md: d=128, b=1e4, L=4096 -> correction range 20..46; s=8 -> attention factor 1.2079441542."""
    d, b, L, s = 128, 1e4, 4096, 8.0
    ramp = yarn_ramp(d, b, L)
    i = torch.arange(d // 2, dtype=torch.float64)
    close(ramp, ((i - 20) / (46 - 20)).clamp(0, 1))
    assert yarn_attention_factor(s) == pytest.approx(1.2079441542, abs=1e-10)
    assert yarn_attention_factor(s) == pytest.approx(0.1 * math.log(8) + 1, rel=1e-15)  # Eq. 22

    theta, new = theta_closed_form(d, b), yarn_inv_freq(d, b, s, L)
    assert torch.equal(new[:21], theta[:21])          # fast pairs (many turns within L): RoPE untouched
    close(new[46:], theta[46:] / s)                   # slow pairs: PI
    g = (i[21:46] - 20) / 26                          # Eq. 20 in between: blend by the ramp
    close(new[21:46], theta[21:46] / s * g + theta[21:46] * (1 - g))
    cfg = RopeConfig(type="yarn", theta=b, factor=s, original_max_position_embeddings=L)
    freqs, factor = cfg.frequencies(d, 10 * L)
    close(freqs, new)
    assert factor == pytest.approx(1.2079441542, abs=1e-10)


def test_yarn_attention_factor_options():
    assert yarn_attention_factor(4.0, attention_factor=0.9) == 0.9     # explicit wins
    assert yarn_attention_factor(1.0) == 1.0
    assert yarn_attention_factor(4.0, mscale=0.707, mscale_all_dim=0.707) == pytest.approx(1.0)
    expected = (0.1 * 1.0 * math.log(40) + 1) / (0.1 * 0.5 * math.log(40) + 1)   # DeepSeek form
    assert yarn_attention_factor(40.0, mscale=1.0, mscale_all_dim=0.5) == pytest.approx(expected, rel=1e-14)


def test_attention_factor_scales_logits_by_its_square():
    """YaRN's factor multiplies cos and sin, so it reaches both q and k: logits scale by a^2 (Eq. 21-22)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 20, 32, generator=g), torch.randn(2, 20, 32, generator=g)
    inv_freq, a = RopeConfig(type="yarn", factor=16.0, original_max_position_embeddings=64).frequencies(32, 20)
    pos = torch.arange(20)

    def logits(factor):
        cos, sin = rope_cos_sin(inv_freq, pos, factor)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(1, 2)

    plain, scaled = logits(1.0), logits(a)
    assert a > 1.2
    torch.testing.assert_close(scaled, plain * a * a, rtol=1e-5, atol=1e-5)


def llama3_by_hand(d, b, s, L, low, high):
    """Llama 3.1's rule written as in Meta's reference code, pair by pair."""
    out = []
    for i in range(d // 2):
        theta = b ** (-2 * i / d)
        wavelen = 2 * math.pi / theta
        if wavelen < L / high:
            out.append(theta)
        elif wavelen > L / low:
            out.append(theta / s)
        else:
            smooth = (L / wavelen - low) / (high - low)
            out.append((1 - smooth) * theta / s + smooth * theta)
    return torch.tensor(out, dtype=torch.float64)


def test_llama3_piecewise():
    d, b, s, L = 128, 5e5, 8.0, 8192                  # Llama 3.1's own settings
    expected = llama3_by_hand(d, b, s, L, 1.0, 4.0)
    theta = theta_closed_form(d, b)
    # the three regimes all occur, so each branch is checked
    assert (expected == theta).any() and torch.isclose(expected, theta / s).any()
    assert ((expected < theta) & ~torch.isclose(expected, theta / s)).any()
    close(llama3_inv_freq(d, b, s, L), expected)
    close(llama3_inv_freq(64, 1e4, 4.0, 256, 2.0, 8.0), llama3_by_hand(64, 1e4, 4.0, 256, 2.0, 8.0))
    cfg = RopeConfig(type="llama3", theta=b, factor=s, original_max_position_embeddings=L)
    close(cfg.frequencies(d, 1)[0], expected)


def test_longrope_ext_factors():
    d, b, L = 8, 1e4, 100
    short, long = (1.0, 1.5, 2.0, 2.5), (1.0, 3.0, 9.0, 27.0)
    theta = theta_closed_form(d, b)
    close(longrope_inv_freq(d, b, short, long, L, L), theta / torch.tensor(short, dtype=torch.float64))
    close(longrope_inv_freq(d, b, short, long, L, L + 1), theta / torch.tensor(long, dtype=torch.float64))
    assert longrope_attention_factor(8.0, 4096) == pytest.approx(math.sqrt(1 + math.log(8) / math.log(4096)))
    cfg = RopeConfig(type="longrope", theta=b, factor=8.0, original_max_position_embeddings=L,
                     short_factor=short, long_factor=long)
    assert cfg.variant.length_dependent
    freqs, a = cfg.frequencies(d, 2 * L)
    close(freqs, theta / torch.tensor(long, dtype=torch.float64))
    assert a == pytest.approx(math.sqrt(1 + math.log(8) / math.log(100)))
    with pytest.raises(RopeliteError, match="d/2 = 8"):
        longrope_inv_freq(16, b, short, long, L, 1)
    with pytest.raises(RopeliteError, match="short_factor"):
        RopeConfig(type="longrope")


@pytest.mark.parametrize("kind", ROPE_TYPES)
def test_scale_one_is_plain_rope(kind):
    d, L = 64, 256
    extra = {"short_factor": (1.0,) * 32, "long_factor": (1.0,) * 32} if kind == "longrope" else {}
    cfg = RopeConfig(type=kind, theta=1e4, factor=1.0, original_max_position_embeddings=L, **extra)
    for seq_len in (10, L) if kind == "dynamic" else (10, L, 4 * L):
        freqs, a = cfg.frequencies(d, seq_len)
        close(freqs, theta_closed_form(d, 1e4), rtol=1e-13)
        assert a == 1.0
    if kind == "dynamic":
        # Hugging Face semantics: beyond L the length itself scales the base even at factor 1 (s*l/L - (s-1) =
        # l/L), i.e. NTK-aware with s = l/L. Not plain RoPE; transformers does the same.
        close(cfg.frequencies(d, 4 * L)[0], theta_closed_form(d, ntk_base(d, 1e4, 4.0)), rtol=1e-13)


def test_factor_below_one_and_unknown_type_are_one_line_errors():
    with pytest.raises(RopeliteError, match="factor") as e:
        RopeConfig(type="pi", factor=0.5)
    assert "\n" not in str(e.value)
    with pytest.raises(RopeliteError, match="factor"):
        RopeConfig(type="pi", factor=float("nan"))
    with pytest.raises(RopeliteError) as e:
        RopeConfig(type="xpos")
    assert all(name in str(e.value) for name in ROPE_TYPES)


def test_a_setting_of_another_variant_is_a_one_line_error_naming_its_variants():
    for kind, key, value, owners in [("pi", "beta_fast", 8.0, ["yarn"]), ("llama3", "attention_factor", 1.2,
                                     ["yarn", "longrope"]), ("yarn", "low_freq_factor", 2.0, ["llama3"])]:
        with pytest.raises(RopeliteError) as e:
            RopeConfig(type=kind, factor=2.0, **{key: value})
        message = str(e.value)
        assert "\n" not in message and all(w in message for w in (key, kind, *owners)), message
    RopeConfig(type="pi", factor=2.0, beta_fast=32.0)  # a default is not a setting: nothing to reject
    RopeConfig(type="yarn", factor=2.0, beta_fast=8.0, attention_factor=1.2)


def test_variant_table_covers_every_setting_once():
    fields = {f.name for f in dataclasses.fields(RopeConfig)}
    assert set(SETTINGS) == fields - {"type", "theta", "factor", "original_max_position_embeddings"}
    assert ROPE_TYPES == tuple(VARIANTS) and all(VARIANTS[k].name == k for k in VARIANTS)


@pytest.mark.parametrize("kind", ROPE_TYPES)
def test_variant_facts_match_the_frequencies(kind):
    """The table's flags, checked against what ``frequencies`` does rather than restated."""
    d, b, L = 16, 1e4, 64
    lists = {"short_factor": (1.0,) * 4 + (2.0,) * 4, "long_factor": (1.0,) * 4 + (3.0,) * 4}
    extra = lists if kind == "longrope" else {}
    cfg = RopeConfig(type=kind, theta=b, factor=2.0, original_max_position_embeddings=L, **extra)
    v = cfg.variant
    inside, beyond = cfg.frequencies(d, L)[0], cfg.frequencies(d, 4 * L)[0]
    assert v.length_dependent == (not torch.equal(inside, beyond))
    assert v.scales_by_factor == (not torch.equal(beyond, cfg.replace(factor=4.0).frequencies(d, 4 * L)[0]))
    (f2, a2), (f4, a4) = cfg.frequencies(d, 4 * L), cfg.replace(factor=4.0).frequencies(d, 4 * L)
    assert v.uses_factor == (not torch.equal(f2, f4) or a2 != a4)   # s reaches the frequencies or the attention
    # A base change keeps theta'_0 = 1 and theta'_i geometric in i, with a new ratio b'^(-2/d).
    ratios = beyond[1:] / beyond[:-1]
    geometric = bool(torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-12))
    new_base = float(beyond[0]) == 1.0 and geometric and not torch.allclose(beyond, rope_inv_freq(d, b))
    assert v.changes_base == new_base


@pytest.mark.parametrize("change", [{"beta_fast": 0.0}, {"beta_slow": 0.0}, {"beta_fast": -1.0},
                                    {"beta_slow": float("nan")}, {"theta": 1.0},
                                    {"original_max_position_embeddings": 0}])
def test_yarn_settings_that_make_the_correction_dims_undefined_are_one_line_errors(change):
    """d ln(L / (2 pi beta)) / (2 ln b) needs beta > 0, L > 0 and b > 1 (else ZeroDivisionError / math domain)."""
    key = next(iter(change))
    with pytest.raises(RopeliteError, match=key) as e:
        RopeConfig(type="yarn", factor=4.0, **change)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------------------
# The rotation
# --------------------------------------------------------------------------------------------------------------

def score_closed_form(q, k, distance, theta):
    """q_m . k_n for the halves layout: pair (x_i, x_{i+d/2}) is the complex number z_i, rotation multiplies it by
    exp(j m theta_i), so the score is Re(sum_i z_q conj(z_k) exp(j (m-n) theta_i)) -- a function of m-n only."""
    h = q.shape[-1] // 2
    zq = q[..., :h].double() + 1j * q[..., h:].double()
    zk = k[..., :h].double() + 1j * k[..., h:].double()
    return (zq * zk.conj() * torch.exp(1j * distance * theta)).sum(-1).real


@pytest.mark.parametrize("kind", ["rope", "pi", "ntk", "yarn", "llama3"])
def test_scores_depend_only_on_distance(kind):
    d = 32
    cfg = RopeConfig(type=kind, theta=1e4, factor=4.0, original_max_position_embeddings=128)
    inv_freq, a = cfg.frequencies(d, 1)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)
    pairs = [(5, 0), (105, 100), (3005, 3000), (0, 7), (4000, 4007), (17, 17), (9017, 9017)]
    m = torch.tensor([p[0] for p in pairs])
    n = torch.tensor([p[1] for p in pairs])
    qm = apply_rope(q.expand(len(pairs), d), *rope_cos_sin(inv_freq, m, a))
    kn = apply_rope(k.expand(len(pairs), d), *rope_cos_sin(inv_freq, n, a))
    scores = (qm * kn).sum(-1).double()
    expected = a * a * score_closed_form(q, k, (m - n).double()[:, None], inv_freq)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    # shifted pairs agree with each other
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores[2], scores[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores[4], scores[3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores[6], scores[5], rtol=1e-4, atol=1e-4)


def test_pi_is_rope_at_fractional_positions():
    s, pos = 4.0, torch.arange(0, 5000, 37)
    pi = rope_cos_sin(pi_inv_freq(64, 1e4, s), pos)
    rope_at_m_over_s = rope_cos_sin(rope_inv_freq(64, 1e4), pos.double() / s)
    for a, b in zip(pi, rope_at_m_over_s):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adjacent_layout_is_eq1_as_written():
    """apply_rope_adjacent rotates (h_2i, h_2i+1) by m theta_i (seed paper Eq. 1), checked with complex numbers."""
    d, pos = 16, torch.tensor([0, 3, 1000])
    theta = rope_inv_freq(d, 1e4)
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(2))
    z = x[:, 0::2].double() + 1j * x[:, 1::2].double()
    z = z * torch.exp(1j * pos.double()[:, None] * theta)
    expected = torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    torch.testing.assert_close(apply_rope_adjacent(x, *rope_cos_sin(theta, pos)).double(), expected,
                               rtol=1e-5, atol=1e-5)


def test_adjacent_and_halves_give_the_same_scores():
    """Meta-ordered q/k weights + Eq. 1 == rows permuted by adjacent_to_halves + rotate_half (HF's converter)."""
    g = torch.Generator().manual_seed(3)
    H, Hkv, d, C, T = 4, 2, 16, 24, 12
    wq, wk = torch.randn(H * d, C, generator=g), torch.randn(Hkv * d, C, generator=g)
    x = torch.randn(T, C, generator=g)
    yarn = RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=8)
    cos, sin = rope_cos_sin(yarn.frequencies(d, T)[0], torch.arange(T) * 100)

    def scores(wq, wk, rotate):
        q = rotate((x @ wq.T).view(T, H, d).transpose(0, 1), cos, sin)      # (H, T, d)
        k = rotate((x @ wk.T).view(T, Hkv, d).transpose(0, 1), cos, sin)   # (Hkv, T, d)
        return q @ k.repeat_interleave(H // Hkv, dim=0).transpose(1, 2)    # (H, T, T)

    meta = scores(wq, wk, apply_rope_adjacent)
    hf = scores(adjacent_to_halves(wq, H), adjacent_to_halves(wk, Hkv), apply_rope)
    torch.testing.assert_close(hf, meta, rtol=1e-4, atol=1e-4)
    # the permutation matters (else this test proves nothing) and is REFERENCE.md's formula
    assert not torch.allclose(scores(wq, wk, apply_rope), meta, atol=1e-2)
    torch.testing.assert_close(adjacent_to_halves(wq, H),
                               wq.reshape(H, d // 2, 2, C).swapaxes(1, 2).reshape(H * d, C), rtol=0, atol=0)


def test_layout_permutations_are_inverse():
    w = torch.arange(6 * 8 * 5, dtype=torch.float32).reshape(6 * 8, 5)
    assert torch.equal(halves_to_adjacent(adjacent_to_halves(w, 6), 6), w)
    assert torch.equal(adjacent_to_halves(halves_to_adjacent(w, 6), 6), w)
    assert not torch.equal(adjacent_to_halves(w, 6), w)
    # within a head, rows 0,2,4,6 come first, then 1,3,5,7
    assert adjacent_to_halves(w, 6)[:8, 0].tolist() == [0, 10, 20, 30, 5, 15, 25, 35]


def test_cos_sin_fp32_exact_at_long_positions_even_for_bf16():
    d, b, m = 64, 1e4, 100_000
    theta = rope_inv_freq(d, b)
    cos, sin = rope_cos_sin(theta, torch.tensor([m, m + 1]))
    assert cos.dtype == sin.dtype == torch.float32
    angles = [m * b ** (-2 * i / d) for i in range(d // 2)]
    torch.testing.assert_close(cos[0].double(), torch.tensor([math.cos(a) for a in angles * 2], dtype=torch.float64),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[0].double(), torch.tensor([math.sin(a) for a in angles * 2], dtype=torch.float64),
                               rtol=0, atol=1e-6)
    # a bf16 input is rotated in fp32 and only rounded at the end: error = one bf16 rounding of the output
    x = torch.randn(2, d, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16
    z = x[:, : d // 2].double() + 1j * x[:, d // 2:].double()
    z = z * torch.exp(1j * torch.tensor([m, m + 1], dtype=torch.float64)[:, None] * theta)
    expected = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(out.double(), expected, rtol=2 ** -8, atol=1e-2)
