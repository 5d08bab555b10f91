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

import numpy as np
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
    """What the code outside a variant's frequency function needs to know about it."""

    name: str
    hf_type: str | None          # transformers' rope_type; None: ntk, which transformers writes as a plain rope_theta
    keys: tuple[str, ...] = ()   # the RopeConfig settings it reads besides theta, factor and L
    length_dependent: bool = False  # frequencies change with the sequence length, so cached keys are re-rotated
    scales_by_factor: bool = True   # a factor s the user picks (rope has none; longrope's are searched lists)
    changes_base: bool = False      # extends by a new base b' (the NTK family), not by rescaling theta_i
    hf_aliases: tuple[str, ...] = ()  # older rope_type names transformers still reads


_YARN_KEYS = ("beta_fast", "beta_slow", "truncate", "attention_factor", "mscale", "mscale_all_dim")

VARIANTS: dict[str, RopeVariant] = {v.name: v for v in (
    RopeVariant("rope", "default", scales_by_factor=False),
    RopeVariant("pi", "linear"),
    RopeVariant("ntk", None, ("base",), changes_base=True),
    RopeVariant("dynamic", "dynamic", length_dependent=True, changes_base=True),
    RopeVariant("yarn", "yarn", _YARN_KEYS),
    RopeVariant("llama3", "llama3", ("low_freq_factor", "high_freq_factor")),
    RopeVariant("longrope", "longrope", ("short_factor", "long_factor", "attention_factor"), length_dependent=True,
                scales_by_factor=False, hf_aliases=("su",)),
)}
ROPE_TYPES = tuple(VARIANTS)
SETTINGS = tuple(dict.fromkeys(k for v in VARIANTS.values() for k in v.keys))  # every variant-specific key


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
            raise RopeliteError(f"unknown rope '{self.type}': choose one of {', '.join(ROPE_TYPES)}")
        if not self.factor >= 1:  # also rejects NaN
            raise RopeliteError(f"rope factor must be >= 1 (extension, not compression), got {self.factor}")
        for key in self.settings():
            if key not in self.variant.keys:
                owners = [v.name for v in VARIANTS.values() if key in v.keys]
                what = "a new base is an NTK setting" if key == "base" else f"{key} is a setting of {', '.join(owners)}"
                raise RopeliteError(f"{what}; rope '{self.type}' does not take one")
        if self.type == "longrope" and (self.short_factor is None or self.long_factor is None):
            raise RopeliteError("rope 'longrope' needs short_factor and long_factor lists")
        if self.type == "yarn":  # the correction dims take log(L / (2 pi beta)) / log(b)
            for key in ("beta_fast", "beta_slow", "original_max_position_embeddings"):
                if not getattr(self, key) > 0:
                    raise RopeliteError(f"yarn needs {key} > 0, got {getattr(self, key)}")
            if not self.theta > 1:
                raise RopeliteError(f"yarn needs a base (theta) > 1, got {self.theta}")

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
        b, s, L = self.theta, self.factor, self.original_max_position_embeddings
        if self.type == "rope":
            return rope_inv_freq(dim, b), 1.0
        if self.type == "pi":
            return pi_inv_freq(dim, b, s), 1.0
        if self.type == "ntk":
            return ntk_inv_freq(dim, b, s, self.base), 1.0
        if self.type == "dynamic":
            return dynamic_inv_freq(dim, b, s, L, seq_len), 1.0
        if self.type == "yarn":
            return (yarn_inv_freq(dim, b, s, L, self.beta_fast, self.beta_slow, self.truncate),
                    yarn_attention_factor(s, self.attention_factor, self.mscale, self.mscale_all_dim))
        if self.type == "llama3":
            return llama3_inv_freq(dim, b, s, L, self.low_freq_factor, self.high_freq_factor), 1.0
        factor = self.attention_factor if self.attention_factor is not None else longrope_attention_factor(s, L)
        return longrope_inv_freq(dim, b, self.short_factor, self.long_factor, L, seq_len), factor

    def describe(self) -> str:
        """A short human label, e.g. 'yarn x4' or 'ntk base 1e+06'."""
        if self.type == "ntk" and self.base is not None:
            return f"ntk base {self.base:g}"
        return self.type if self.type == "rope" else f"{self.type} x{self.factor:g}"


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: the 90-degree turn of each pair (i, i + d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, d) in the halves layout: pair (x_i, x_{i+d/2}) turns by the angle of pair i.
    Done in float32 and cast back, so a bf16 model keeps exact angles."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def apply_rope_adjacent(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The seed paper's Eq. 1 as written (and Meta's checkpoints): adjacent pairs (h_2i, h_2i+1) turn by
    m * theta_i. Takes the same (T, d) tables as ``apply_rope``. It gives the same attention scores as
    ``apply_rope`` once q/k projection rows are reordered with ``adjacent_to_halves``."""
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
    """Inverse of ``adjacent_to_halves`` (what llama.cpp's converter applies to Hugging Face weights)."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, in_features)   # (heads, pair, d/2, in)
            .transpose(1, 2)                                         # (heads, d/2, pair, in)
            .reshape(out_features, in_features))


# --------------------------------------------------------------------------------------------------------------
# Men et al. 2024, "Base of RoPE Bounds Context Length"
# --------------------------------------------------------------------------------------------------------------

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


def base_reaches(dim: int, base: float, length: int) -> bool:
    return first_negative_B(dim, base, length) is None


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
