"""The miniature's design (``ablation.py``; its pieces are in ``ropelite.ablation``): its sizes (``Mini``), its
models and where each one lives in a run folder. Three models are not finetuned (``FREE``: the pretrained model,
and NTK and YaRN applied to it training-free); each finetune (``Finetune``) is NTK or YaRN at cfg.factor trained
at L or at 8L on one stream and seed (the mixed stream of each of ``Mini.seeds``, the text stream of each of
``Mini.text_seeds``), 16 with the defaults. ``ropelite.ablation_pipeline`` makes and evaluates them;
``ropelite.ablation_report`` reads them back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .ablation import TEXT_ONLY, Mix, Recipe

# The evaluation's passkeys (haystack.passkeys' seed). The recipe was made in earlier runs that looked at seed 0's
# first 7 keys of every cell; these keys were never looked at before the recipe was fixed.
EVAL_KEY_SEED = 1


@dataclasses.dataclass(frozen=True)
class Mini:
    """Every size of the miniature. The pretraining is run C of the exploration (a 0.94M-parameter model, 5.1M
    tokens); the finetune recipe is the one earlier runs settled on (327,680 tokens in 160 steps of 2,048, lr 1e-3,
    YaRN's linear schedule, the pretraining's mix), unchanged here: nothing is tuned on these results."""
    L: int = 128
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    ffn: int = 384
    vocab: int = 2000
    factor: float = 8.0
    pretrain: Recipe = Recipe(length=128, sequences=16, steps=2500, lr=5e-3, warmup=100, schedule="cosine",
                              min_lr_ratio=0.1, mix=Mix(curriculum=8000), seed=0)
    # 16 rows of L or 2 of 8L per step, cut from one stream (finetune_stream) per seed
    finetune: Recipe = Recipe(length=128, sequences=16, steps=160, lr=1e-3, warmup=10, schedule="linear", mix=Mix())
    kinds: tuple[str, ...] = ("books", "prose", "code")
    ppl_multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    windows_per_kind: int = 4
    passkey_lengths: tuple[int, ...] = (96, 128, 256, 512, 1024, 2048)
    depths: tuple[int, ...] = (10, 50, 90)
    keys: int = 10                         # per (length, depth): 30 trials per length per model
    seeds: tuple[int, ...] = (1, 2, 3)     # finetune seeds of the mixed stream (its document order and draws)
    text_seeds: tuple[int, ...] = (1,)     # of the text-only stream

    @property
    def lengths(self) -> list[int]:
        return [m * self.L for m in self.ppl_multiples]

    def stream_seeds(self) -> dict[str, tuple[int, ...]]:
        return {"mixed": self.seeds, "text": self.text_seeds}

    def mix(self, stream: str) -> Mix:
        return self.finetune.mix if stream == "mixed" else TEXT_ONLY


ROPE_NAMES = {"ntk": "NTK", "yarn": "YaRN"}
# name -> (rope override of the pretrained model, label): the models that were not finetuned
FREE = {"rope": (None, "pretrained (RoPE)"), "ntk-free": ("ntk", "NTK x8, training-free"),
        "yarn-free": ("yarn", "YaRN x8, training-free")}
STREAM_LABELS = {"mixed": "", "text": ", text-only stream"}


@dataclasses.dataclass(frozen=True)
class Finetune:
    """One finetuned model: a RoPE at cfg.factor, trained at ``times`` x L on stream ``stream`` of seed ``seed``."""
    rope: str
    times: int
    stream: str
    seed: int

    @property
    def arm(self) -> str:
        return f"{self.rope}-{'8L' if self.times > 1 else 'L'}"

    @property
    def name(self) -> str:
        return f"{self.arm}.{self.stream}{self.seed}"


def finetunes(cfg: Mini) -> list[Finetune]:
    return [Finetune(rope, times, stream, seed) for stream, seeds in cfg.stream_seeds().items() for seed in seeds
            for rope in ROPE_NAMES for times in (1, 8)]


def model_names(cfg: Mini) -> list[str]:
    return [*FREE, *(f.name for f in finetunes(cfg))]


def model_folder(out: Path, name: str) -> Path:
    return out / "pretrained" if name in FREE else out / "finetunes" / name
