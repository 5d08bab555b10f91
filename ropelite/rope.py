"""RoPE and its extensions: one pure function per method, one shared rotation.

Notation (as in ../shared/REFERENCE.md and the papers):
    d    rotary dimension (the head dim), pairs i = 0 .. d/2 - 1
    b    base (``rope_theta``, ``RopeConfig.theta``), theta_i = b^(-2i/d)   -- RoFormer, seed paper Eq. 1
    L    the context the model was pretrained at (``original_max_position_embeddings``)
    s    scale factor (``factor``)
    b'   NTK's new base that replaces b (``RopeConfig.base``)

Every ``*_inv_freq`` function returns the per-pair angular frequencies theta'_i as a float64 tensor of shape
(d/2,); position m is then rotated by the angle m * theta'_i. Angles are formed in float64 and cos/sin are
handed to the model in float32 whatever dtype the model runs in: bf16 positions lose whole radians past a few
thousand tokens (transformers #25681).

The semantics match Hugging Face ``rope_scaling`` (rope_type default / linear / dynamic / yarn / llama3 /
longrope) so that a checkpoint means the same thing here and there; ``ntk`` is the seed paper's fixed base
change, which transformers expresses as a plain ``rope_theta``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import RopeliteError

# --------------------------------------------------------------------------------------------------------------
# Frequencies, one pure function per method
# --------------------------------------------------------------------------------------------------------------

def rope_inv_freq(dim: int, base: float) -> torch.Tensor:
    """Plain RoPE (RoFormer; seed paper Eq. 1): theta_i = b^(-2i/d)."""
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def pi_inv_freq(dim: int, base: float, factor: float) -> torch.Tensor:
    """Position Interpolation (Chen et al. 2023; YaRN paper Eq. 10-12): position m becomes m/s,
    which is the same as dividing every frequency by s."""
    return rope_inv_freq(dim, base) / factor


def ntk_base(dim: int, base: float, factor: float) -> float:
    """NTK-aware base change (YaRN paper Eq. 16): b' = b * s^(d/(d-2)). The exponent makes the slowest pair
    interpolate by exactly s while the fastest pair is left (almost) untouched."""
    return base * factor ** (dim / (dim - 2))


def ntk_inv_freq(dim: int, base: float, factor: float = 1.0, new_base: float | None = None) -> torch.Tensor:
    """NTK with a fixed new base: either explicit (seed paper / Code Llama: 1e4 -> 1e6) or from a scale s."""
    return rope_inv_freq(dim, new_base if new_base is not None else ntk_base(dim, base, factor))


def dynamic_inv_freq(dim: int, base: float, factor: float, original_max: int, seq_len: int) -> torch.Tensor:
    """Dynamic NTK (Hugging Face "dynamic"): plain RoPE up to L; beyond, for the current length l,
    b' = b * (s*l/L - (s - 1))^(d/(d-2)). It depends on the sequence length, so it is recomputed per forward."""
    if seq_len <= original_max:
        return rope_inv_freq(dim, base)
    return rope_inv_freq(dim, base * (factor * seq_len / original_max - (factor - 1)) ** (dim / (dim - 2)))


def yarn_correction_dim(num_rotations: float, dim: int, base: float, original_max: int) -> float:
    """The (fractional) pair index whose wavelength fits ``num_rotations`` times into L:
    L / (2 pi b^(2i/d)) = r  <=>  i = d ln(L / (2 pi r)) / (2 ln b)   (YaRN paper Eq. 17-18, solved for i)."""
    return dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_ramp(dim: int, base: float, original_max: int, beta_fast: float = 32.0, beta_slow: float = 1.0,
              truncate: bool = True) -> torch.Tensor:
    """YaRN's ramp gamma_i in [0, 1] per pair: 0 = keep RoPE (fast pairs, many rotations in L), 1 = interpolate
    like PI (slow pairs). We use the code form that YaRN checkpoints are trained with (linear in the pair index
    between floor/ceil of the correction dims, clamped to [0, d-1]), not the paper's ramp linear in r = L/lambda."""
    low = yarn_correction_dim(beta_fast, dim, base, original_max)
    high = yarn_correction_dim(beta_slow, dim, base, original_max)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero; the ramp becomes a step
    i = torch.arange(dim // 2, dtype=torch.float64)
    return ((i - low) / (high - low)).clamp(0, 1)


def yarn_inv_freq(dim: int, base: float, factor: float, original_max: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, truncate: bool = True) -> torch.Tensor:
    """YaRN "NTK-by-parts" frequencies (YaRN paper Eq. 19-20): theta'_i = theta_i/s * gamma_i + theta_i * (1 - gamma_i)."""
    theta = rope_inv_freq(dim, base)
    ramp = yarn_ramp(dim, base, original_max, beta_fast, beta_slow, truncate)
    return theta / factor * ramp + theta * (1 - ramp)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """sqrt(1/t) = 0.1 ln(s) + 1 (YaRN paper Eq. 21-22), with DeepSeek's optional multiplier on the 0.1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(factor: float, attention_factor: float | None = None, mscale: float | None = None,
                          mscale_all_dim: float | None = None) -> float:
    """The factor that multiplies cos and sin (so both q and k), hence the logits by its square: softmax
    temperature t with sqrt(1/t) = 0.1 ln s + 1. An explicit ``attention_factor`` wins."""
    if attention_factor is not None:
        return attention_factor
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def llama3_inv_freq(dim: int, base: float, factor: float, original_max: int, low_freq_factor: float = 1.0,
                    high_freq_factor: float = 4.0) -> torch.Tensor:
    """Llama 3.1: keep pairs whose wavelength is shorter than L/high_freq_factor, divide by s those longer than
    L/low_freq_factor, and blend linearly in L/lambda in between."""
    theta = rope_inv_freq(dim, base)
    wavelen = 2 * math.pi / theta
    smooth = ((original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * theta / factor + smooth * theta


def longrope_inv_freq(dim: int, base: float, short_factor, long_factor, original_max: int,
                      seq_len: int) -> torch.Tensor:
    """LongRoPE (Ding et al. 2024): searched per-pair rescale factors, the long set beyond L:
    theta'_i = theta_i / ext_i."""
    ext = torch.tensor(long_factor if seq_len > original_max else short_factor, dtype=torch.float64)
    if ext.shape != (dim // 2,):
        raise RopeliteError(f"longrope factors must have d/2 = {dim // 2} entries, got {tuple(ext.shape)}")
    return rope_inv_freq(dim, base) / ext


def longrope_attention_factor(factor: float, original_max: int) -> float:
    """LongRoPE's logit scale sqrt(1 + ln s / ln L) on cos and sin."""
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original_max))


# --------------------------------------------------------------------------------------------------------------
# The variants: one table of facts, and the config that picks one
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RopeVariant:
    """Everything about a variant that the code outside its frequency function needs: ``RopeConfig`` calls its
    ``inv_freq``; ``hf`` writes and reads config.json by its ``hf_*`` facts; ``cli`` decides from
    ``scales_by_factor`` and ``takes_base`` which flags it needs. A new variant is a frequency function above and
    one entry in ``VARIANTS``; nothing else names it."""

    name: str
    inv_freq: Callable[["RopeConfig", int, int], torch.Tensor]  # (config, d, sequence length) -> theta' (d/2,)
    hf_type: str | None                # transformers' rope_type; None: it has none, and runs it as plain RoPE
    keys: tuple[str, ...] = ()         # the RopeConfig settings it reads besides theta, factor and L
    attention: Callable[["RopeConfig"], float] | None = None  # the factor on cos and sin; None: 1
    check: Callable[["RopeConfig"], None] | None = None       # raises RopeliteError on settings it cannot run
    length_dependent: bool = False     # frequencies change with the sequence length, so cached keys are re-rotated
    uses_factor: bool = True           # its frequencies or attention factor read s (plain RoPE's do not)
    scales_by_factor: bool = True      # s is the user's to pick (longrope's comes with its searched lists)
    changes_base: bool = False         # extends by a new base b' (the NTK family), not by rescaling theta_i
    plain_base: Callable[["RopeConfig", int], float] | None = None  # hf_type None: the b' written as rope_theta
    hf_length: str | None = None       # where transformers reads L: "rope_scaling" (its original_max_position_
    #                                    embeddings), "max_position_embeddings" (so that key holds L, not L * s),
    #                                    or None (it does not read L)
    hf_factor_from_lengths: bool = False  # a config.json without a factor means s = max_position_embeddings / L
    hf_aliases: tuple[str, ...] = ()   # older rope_type names transformers still reads

    @property
    def takes_base(self) -> bool:
        """A new base b' (``--base``) is one of its settings, and stands in for the factor."""
        return "base" in self.keys


def _check_yarn(c: "RopeConfig") -> None:
    """The correction dims take log(L / (2 pi beta)) / log(b): they need beta > 0, L > 0 and b > 1."""
    for key in ("beta_fast", "beta_slow", "original_max_position_embeddings"):
        if not getattr(c, key) > 0:
            raise RopeliteError(f"yarn needs {key} > 0, got {getattr(c, key)}")
    if not c.theta > 1:
        raise RopeliteError(f"yarn needs a base (theta) > 1, got {c.theta}")


def _check_longrope(c: "RopeConfig") -> None:
    if c.short_factor is None or c.long_factor is None:
        raise RopeliteError("rope 'longrope' needs short_factor and long_factor lists")


def _longrope_attention(c: "RopeConfig") -> float:
    return c.attention_factor if c.attention_factor is not None else longrope_attention_factor(
        c.factor, c.original_max_position_embeddings)


_YARN_KEYS = ("beta_fast", "beta_slow", "truncate", "attention_factor", "mscale", "mscale_all_dim")

VARIANTS: dict[str, RopeVariant] = {v.name: v for v in (
    RopeVariant("rope", lambda c, d, n: rope_inv_freq(d, c.theta),
                hf_type="default", uses_factor=False, scales_by_factor=False),
    RopeVariant("pi", lambda c, d, n: pi_inv_freq(d, c.theta, c.factor),
                hf_type="linear"),
    RopeVariant("ntk", lambda c, d, n: ntk_inv_freq(d, c.theta, c.factor, c.base),
                hf_type=None, keys=("base",), changes_base=True,
                plain_base=lambda c, d: c.base if c.base is not None else ntk_base(d, c.theta, c.factor)),
    RopeVariant("dynamic",
                lambda c, d, n: dynamic_inv_freq(d, c.theta, c.factor, c.original_max_position_embeddings, n),
                hf_type="dynamic", length_dependent=True, changes_base=True, hf_length="max_position_embeddings"),
    RopeVariant("yarn",
                lambda c, d, n: yarn_inv_freq(d, c.theta, c.factor, c.original_max_position_embeddings,
                                              c.beta_fast, c.beta_slow, c.truncate),
                attention=lambda c: yarn_attention_factor(c.factor, c.attention_factor, c.mscale, c.mscale_all_dim),
                hf_type="yarn", keys=_YARN_KEYS, check=_check_yarn, hf_length="rope_scaling"),
    RopeVariant("llama3",
                lambda c, d, n: llama3_inv_freq(d, c.theta, c.factor, c.original_max_position_embeddings,
                                                c.low_freq_factor, c.high_freq_factor),
                hf_type="llama3", keys=("low_freq_factor", "high_freq_factor"), hf_length="rope_scaling"),
    RopeVariant("longrope",
                lambda c, d, n: longrope_inv_freq(d, c.theta, c.short_factor, c.long_factor,
                                                  c.original_max_position_embeddings, n),
                attention=_longrope_attention,
                hf_type="longrope", keys=("short_factor", "long_factor", "attention_factor"), check=_check_longrope,
                length_dependent=True, scales_by_factor=False, hf_length="rope_scaling", hf_factor_from_lengths=True,
                hf_aliases=("su",)),
)}
ROPE_TYPES = tuple(VARIANTS)
SETTINGS = tuple(dict.fromkeys(k for v in VARIANTS.values() for k in v.keys))  # every variant-specific key


def check_scale_factor(factor: float) -> None:
    """A scale factor s is a finite number >= 1: RoPE extensions stretch the context, they do not compress it
    (NaN and inf fail here, not later as a length of round(L * s))."""
    if not (math.isfinite(factor) and factor >= 1):
        raise RopeliteError(f"rope factor must be >= 1 (extension, not compression), got {factor}")


@dataclass(frozen=True)
class RopeConfig:
    """Everything that decides the rotation, in Hugging Face's vocabulary.

    ``theta`` is ``rope_theta``: the pretrained base b of theta_i = b^(-2i/d) (a number like 1e4, not a
    frequency theta_i). ``base`` is NTK's new base b' that replaces it (None: b' = b * s^(d/(d-2))). A setting
    of one variant (e.g. ``beta_fast``) set to a non-default value on another is an error, not ignored."""

    type: str = "rope"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    base: float | None = None                 # ntk: explicit new base; None = b * s^(d/(d-2))
    beta_fast: float = 32.0                   # yarn
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None     # yarn / longrope: explicit override
    mscale: float | None = None
    mscale_all_dim: float | None = None
    low_freq_factor: float = 1.0              # llama3
    high_freq_factor: float = 4.0
    short_factor: tuple | None = None         # longrope
    long_factor: tuple | None = None

    def __post_init__(self):
        if self.type not in VARIANTS:
            raise RopeliteError(f"unknown rope '{self.type}': choose one of {', '.join(VARIANTS)}")
        check_scale_factor(self.factor)
        v = self.variant
        for key in self.settings():
            if key not in v.keys:
                owners = [u.name for u in VARIANTS.values() if key in u.keys]
                what = ("a new base is an NTK setting" if key == "base" else
                        f"{key} is a setting of {', '.join(owners)}")
                raise RopeliteError(f"{what}; rope '{self.type}' does not take one")
        if v.check is not None:
            v.check(self)

    @property
    def variant(self) -> RopeVariant:
        return VARIANTS[self.type]

    def settings(self) -> dict:
        """The variant-specific settings (of ``SETTINGS``) that are set, i.e. differ from their defaults."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in SETTINGS and getattr(self, f.name) != f.default}

    def replace(self, **changes) -> "RopeConfig":
        return dataclasses.replace(self, **changes)

    def frequencies(self, dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
        """(theta' of shape (d/2,) in float64, attention factor applied to cos and sin) at this length."""
        v = self.variant
        return v.inv_freq(self, dim, seq_len), 1.0 if v.attention is None else v.attention(self)

    def describe(self) -> str:
        """A short human label, e.g. 'yarn x4' or 'ntk base 1e+06'."""
        if self.base is not None:
            return f"{self.type} base {self.base:g}"
        return f"{self.type} x{self.factor:g}" if self.variant.uses_factor else self.type


def pair_table(rope: RopeConfig, dim: int, seq_len: int) -> list[dict]:
    """What the variant does to each pair i at ``seq_len`` (``analyze.py freqs``): theta_i of plain RoPE at the
    pretrained base, the variant's theta'_i, both wavelengths 2 pi / theta in tokens, the scale theta_i / theta'_i
    (1: kept as RoPE; s: interpolated like PI) and L / wavelength, the turns the pair makes within the pretrained
    context L."""
    original = rope_inv_freq(dim, rope.theta)
    inv_freq, _ = rope.frequencies(dim, seq_len)
    rows = []
    for i, (t, t_new) in enumerate(zip(original.tolist(), inv_freq.tolist())):
        wavelength = 2 * math.pi / t_new
        rows.append({"pair": i, "theta": t, "theta_new": t_new, "wavelength_original": 2 * math.pi / t,
                     "wavelength": wavelength, "scale": t / t_new,
                     "rotations_in_original_context": rope.original_max_position_embeddings / wavelength})
    return rows


# --------------------------------------------------------------------------------------------------------------
# The rotation, shared by every variant
# --------------------------------------------------------------------------------------------------------------

def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float = 1.0,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (T, d) in the Hugging Face halves layout (each angle twice: [f, f]),
    float32, scaled by the attention factor. Angles m * theta_i are formed in float64."""
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]  # (T, d/2)
    angles = torch.cat([angles, angles], dim=-1)                                              # (T, d)
    return ((angles.cos() * attention_factor).to(torch.float32),
            (angles.sin() * attention_factor).to(torch.float32))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, d) in the halves layout: pair (x_i, x_{i+d/2}) turns by the angle a_i of pair i,
    to (x_i cos a_i - x_{i+d/2} sin a_i, x_{i+d/2} cos a_i + x_i sin a_i) (Hugging Face writes it
    x cos + rotate_half(x) sin, rotate_half(x1, x2) = (-x2, x1)). The products are taken in float32 whatever x is
    and rounded once into x's dtype, so a bf16 model keeps exact angles. Half by half into one output: no rotated
    copy and no float32 result to convert (in a bf16 forward at 8K Hugging Face's form of these passes cost more
    than the q/k/v projections)."""
    half = x.shape[-1] // 2
    x32 = x.float()                                     # a copy only for a reduced dtype; one, not one per product
    x1, x2 = x32[..., :half], x32[..., half:]
    c, s = cos[..., :half], sin[..., :half]             # the tables hold each pair's angle twice: [a, a]
    out = torch.empty_like(x)
    out[..., :half] = (x1 * c).addcmul_(x2, s, value=-1)                    # x1 cos - x2 sin
    out[..., half:] = (x2 * c).addcmul_(x1, s)                              # x2 cos + x1 sin
    return out


def apply_rope_adjacent(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The seed paper's Eq. 1 as written (and Meta's checkpoints): adjacent pairs (h_2i, h_2i+1) turn by
    m * theta_i. Takes the same (T, d) tables as ``apply_rope``. It gives the same attention scores as
    ``apply_rope`` once q/k projection rows are reordered with ``adjacent_to_halves``. The model runs the halves
    layout; this is here to teach the paper's layout, and the tests prove the two equivalent with it."""
    c, s = cos[..., : x.shape[-1] // 2], sin[..., : x.shape[-1] // 2]   # (T, d/2): one angle per pair
    pairs = x.float().unflatten(-1, (-1, 2))                              # (..., T, d/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * c - odd * s, odd * c + even * s], dim=-1)
    return rotated.flatten(-2).to(x.dtype)                                # (..., T, d)


def adjacent_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q or k projection from the adjacent-pair layout (Meta, GGUF) to the
    halves layout (Hugging Face): within each head, rows 0,2,4,.. come first, then rows 1,3,5,.."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (weight.reshape(n_heads, head_dim // 2, 2, in_features)   # (heads, d/2, pair, in)
            .transpose(1, 2)                                         # (heads, pair, d/2, in)
            .reshape(out_features, in_features))


def halves_to_adjacent(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``adjacent_to_halves``: the direction of llama.cpp's converter, which writes Hugging Face
    weights to GGUF in the adjacent layout. ropelite only reads GGUF (``adjacent_to_halves``); this is kept to
    document that layout both ways, and the tests check the two are inverse."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, in_features)   # (heads, pair, d/2, in)
            .transpose(1, 2)                                         # (heads, d/2, pair, in)
            .reshape(out_features, in_features))
