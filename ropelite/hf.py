"""The Hugging Face layout, both ways: ``config.json`` <-> ``LlamaConfig``, safetensors <-> ``Llama``.

Reads transformers 4.x configs (``rope_theta`` + ``rope_scaling``) and 5.x ones (``rope_parameters``), plus
ropelite's own ``ropelite`` record of what transformers cannot say (a fixed-base NTK, the pretrained base).
Loading is strict: a missing, unexpected or wrong-shaped tensor is an error naming it. Hugging Face tensor
names are ours with a leading ``model.`` (``hf_name``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import RopeliteError
from .io import atomic_path, write_json
from .model import Llama, LlamaConfig
from .rope import VARIANTS, RopeConfig, RopeVariant

# --------------------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------------------

def config_from_hf(d: dict) -> LlamaConfig:
    """A ``LlamaConfig`` from a transformers ``config.json`` dict (4.x or 5.x, plus our ``ropelite`` record)."""
    if d.get("model_type") != "llama" and "LlamaForCausalLM" not in (d.get("architectures") or []):
        raise RopeliteError(f"unsupported architecture '{d.get('model_type')}': ropelite runs LLaMa models")
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise RopeliteError(f"config sets {flag}=true, which ropelite's LLaMa does not implement")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # the same function under two names
        raise RopeliteError(f"config sets hidden_act={act!r}; ropelite's LLaMa implements SwiGLU (silu) only")
    try:
        heads = d["num_attention_heads"]
        return LlamaConfig(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=d.get("tie_word_embeddings", False), bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"), rope=_rope_from_hf(d))
    except KeyError as e:
        raise RopeliteError(f"config.json lacks the key {e}") from None


def _variant_of_hf_type(hf_type: str) -> RopeVariant:
    """The variant transformers calls ``hf_type`` (its rope_type, or an older alias of one)."""
    known = {name: v for v in VARIANTS.values() for name in (v.hf_type, *v.hf_aliases) if name}
    if hf_type not in known:
        raise RopeliteError(f"unsupported rope_scaling type '{hf_type}': ropelite reads {', '.join(known)}")
    return known[hf_type]


def _rope_from_hf(d: dict) -> RopeConfig:
    own = d.get("ropelite")
    params = dict(d.get("rope_parameters") or {})           # transformers 5.x
    scaling = dict(d.get("rope_scaling") or params)          # transformers 4.x
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    v = _variant_of_hf_type(scaling.get("rope_type") or scaling.get("type") or "default")
    mine = VARIANTS.get((own or {}).get("rope"))
    if mine is not None and mine.hf_type is None:  # rope_theta holds its plain base b'; our record tells the story
        return RopeConfig(type=mine.name, theta=own["theta"], factor=own["factor"],
                          original_max_position_embeddings=own["original_max_position_embeddings"],
                          **{k: own[k] for k in mine.keys if own.get(k) is not None})
    max_len = d.get("max_position_embeddings", 4096)
    # transformers' dynamic scales from max_position_embeddings whatever rope_scaling says; Phi-3-style configs
    # keep the pretrained length at the top level.
    original = (max_len if v.hf_length == "max_position_embeddings" else
                d.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings") or max_len)
    if own:
        original = own["original_max_position_embeddings"]
    settings = {k: tuple(scaling[k]) if isinstance(scaling[k], list) else scaling[k]  # lists: longrope's factors
                for k in v.keys if scaling.get(k) is not None}
    factor = scaling.get("factor")
    if factor is None:  # transformers: longrope without a factor scales by the ratio of the two lengths
        factor = max_len / original if v.hf_factor_from_lengths else 1.0
    return RopeConfig(type=v.name, theta=theta, factor=float(factor) if v.uses_factor else 1.0,
                      original_max_position_embeddings=int(original), **settings)


def config_to_hf(c: LlamaConfig) -> dict:
    """A ``config.json`` that transformers (4.x and 5.x) loads as the same model with the same RoPE."""
    r, v = c.rope, c.rope.variant
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
         "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
         "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
         "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
         "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": c.tie_word_embeddings,
         "attention_bias": False, "mlp_bias": False, "bos_token_id": c.bos_token_id,
         "eos_token_id": c.eos_token_id, "rope_theta": r.theta, "rope_scaling": None,
         "max_position_embeddings": r.original_max_position_embeddings}
    if v.hf_type is None:  # transformers has no name for it: it runs plain RoPE at the variant's base b'
        d["rope_theta"] = v.plain_base(r, c.head_dim)
    elif v.uses_factor:
        scaling = {"rope_type": v.hf_type, "type": v.hf_type, "factor": r.factor}
        if v.hf_length == "rope_scaling":
            scaling["original_max_position_embeddings"] = r.original_max_position_embeddings
        # Each key of the type even at its default: transformers requires some (llama3's low/high_freq_factor)
        # and warns about keys that belong to another type; truncate only when off (older versions do not know it).
        scaling.update({k: getattr(r, k) for k in v.keys if k != "truncate" and getattr(r, k) is not None})
        if not r.truncate:
            scaling["truncate"] = False
        d["rope_scaling"] = scaling
        if v.hf_length != "max_position_embeddings":  # transformers reads the extended length there
            d["max_position_embeddings"] = int(r.original_max_position_embeddings * r.factor)
    # What transformers cannot say (a fixed-base NTK, the pretrained base) is recorded for ropelite.
    d["ropelite"] = {"rope": r.type, "factor": r.factor, "theta": r.theta, "base": r.base,
                     "original_max_position_embeddings": r.original_max_position_embeddings,
                     "max_position_embeddings": int(r.original_max_position_embeddings * r.factor)}
    return d


def _config_dict(path: Path) -> dict:
    if not path.exists():
        raise RopeliteError(f"no such model: {path}")
    file = path / "config.json"
    if not file.is_file():
        raise RopeliteError(f"no config.json in {path}: not a Hugging Face model directory")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise RopeliteError(f"{file} is not valid JSON: {e}") from None


def read_config(path: Path) -> LlamaConfig:
    return config_from_hf(_config_dict(Path(path)))


def trained_length(path: Path) -> int:
    """The length the model was last trained at: the --len of a ropelite finetune (its config's ``ropelite``
    record), else the pretrained length L. Figures draw their "training length" line here."""
    d = _config_dict(Path(path))
    trained = (d.get("ropelite") or {}).get("trained") or {}
    if trained.get("len"):
        return int(trained["len"])
    return config_from_hf(d).rope.original_max_position_embeddings


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------

def hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def _safetensors_files(path: Path) -> list[Path]:
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    raise RopeliteError(f"no model.safetensors or model.safetensors.index.json in {path}")


def read_weights(path: Path, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, by Hugging Face name, in dtype on device."""
    from safetensors import SafetensorError, safe_open
    tensors = {}
    for file in _safetensors_files(path):
        if not file.is_file():
            raise RopeliteError(f"shard {file.name} named by the index is missing in {path}")
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key).to(dtype=dtype, device=device)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise RopeliteError(f"cannot read {file}: {str(e).splitlines()[0]} (truncated or corrupt?)") from None
    return tensors


def load_model(path, rope: str | None = None, factor: float | None = None, dtype: torch.dtype = torch.float32,
               device="cpu", **rope_kwargs) -> Llama:
    """Load a Hugging Face LLaMa directory. The RoPE variant is the config's unless ``rope``/``factor``/
    rope_kwargs (e.g. ``base=1e6`` for ntk, ``beta_fast``) override it; the pretrained base and length stay."""
    path = Path(path)
    config = read_config(path).with_rope(rope, factor, **rope_kwargs)
    tensors = read_weights(path, dtype, device)
    with torch.device("meta"):
        model = Llama(config)
    expected = {hf_name(k): v.shape for k, v in model.state_dict().items()
                if not (config.tie_word_embeddings and k == "lm_head.weight")}
    for key in sorted(set(tensors) - set(expected)):
        if key.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and key == "lm_head.weight"):
            continue  # derived values some checkpoints carry; ours are computed from the config
        raise RopeliteError(f"unexpected tensor '{key}' in {path}")
    for key, shape in expected.items():
        if key not in tensors:
            raise RopeliteError(f"missing tensor '{key}' in {path}")
        if tensors[key].shape != shape:
            raise RopeliteError(f"tensor '{key}' has shape {tuple(tensors[key].shape)}, expected {tuple(shape)}")
    return model_from_state(config, {k.removeprefix("model."): tensors[k] for k in expected}).eval()


def model_from_state(config: LlamaConfig, state: dict[str, torch.Tensor]) -> Llama:
    """A Llama around existing tensors, assigned rather than copied, keyed by our module names (a tied
    ``lm_head.weight`` may be absent): for loading, and for saving a gathered training state dict."""
    with torch.device("meta"):
        model = Llama(config)
    if config.tie_word_embeddings:  # the meta model lists the shared weight under both names
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def shard_groups(sizes: list[int], max_bytes: int | None) -> list[list[int]]:
    """Indices of tensors of ``sizes`` bytes, in order, cut into files of at most ``max_bytes`` (a larger tensor
    has a file to itself; None = one file): Hugging Face's sharding."""
    groups, total = [[]], 0
    for i, size in enumerate(sizes):
        if max_bytes and groups[-1] and total + size > max_bytes:
            groups, total = groups + [[]], 0
        groups[-1].append(i)
        total += size
    return groups


def shard_names(n: int) -> list[str]:
    """The file names of a model saved in ``n`` files, as transformers expects them."""
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_shard_index(out: Path, keys: list[str], groups: list[list[int]], total_size: int) -> None:
    """``model.safetensors.index.json`` (which file holds each tensor) for a model in several files; for one file,
    none (a stale index would shadow nothing, but would mislead a reader)."""
    index = out / "model.safetensors.index.json"
    if len(groups) > 1:
        names = shard_names(len(groups))
        write_json(index, {"metadata": {"total_size": total_size},
                           "weight_map": {keys[i]: n for n, group in zip(names, groups) for i in group}})
    else:
        index.unlink(missing_ok=True)


def save_model(model: Llama, out_dir, max_shard_bytes: int | None = None, extra_config: dict | None = None) -> Path:
    """Write safetensors (sharded with an index past ``max_shard_bytes``) and a transformers-loadable
    config.json. Each file is written atomically; config.json last, so a directory with a config is complete."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tied = model.config.tie_word_embeddings
    state = {hf_name(k): v.detach().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    keys, sizes = list(state), [t.numel() * t.element_size() for t in state.values()]
    groups = shard_groups(sizes, max_shard_bytes)
    for name, group in zip(shard_names(len(groups)), groups):
        with atomic_path(out / name) as tmp:
            save_file({keys[i]: state[keys[i]] for i in group}, str(tmp), metadata={"format": "pt"})
    write_shard_index(out, keys, groups, sum(sizes))
    dtype = next(iter(state.values())).dtype
    config = {**config_to_hf(model.config), "torch_dtype": str(dtype).removeprefix("torch."), **(extra_config or {})}
    write_json(out / "config.json", config)
    return out
