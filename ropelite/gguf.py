"""Convert a LLaMa-architecture GGUF file (llama.cpp's format) into a Hugging Face-style model directory.

The output is what `ropelite.model.load_model` reads: `config.json`, `model.safetensors` (HF tensor names, HF
"halves" rotary layout, float32) and, for byte-level BPE vocabularies, `tokenizer.json` +
`tokenizer_config.json`. Weights are saved in float32 because dequantised Q4/Q8 values (block scale x integer,
computed in float32) are not exactly representable in bf16/fp16; `load_model` casts to the requested dtype.
"""

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ropelite.errors import RopeliteError

# llama.cpp's per-block tensor names -> Hugging Face LlamaForCausalLM names (without "model.layers.N." / ".weight")
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# GGUF token types (llama.cpp's llama_token_type): 3 = control (<|im_start|>, <s>), 4 = user-defined
_CONTROL, _USER_DEFINED = 3, 4

# Llama-3's pre-tokenizer regex (as in its tokenizer.json): digits in groups of at most 3, letters with one
# optional leading non-letter, punctuation runs, newlines kept apart from other whitespace.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def convert_gguf(gguf_path, out_dir) -> Path:
    """Convert `gguf_path` into the HF-style directory `out_dir` (which must not exist yet); returns out_dir.

    The directory is built next to out_dir under a temporary name and renamed at the end, so an interrupted
    conversion never leaves a half-written out_dir behind.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise RopeliteError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists():
        raise RopeliteError(f"conversion target already exists: {out_dir}")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # the reader raises ValueError/struct.error/... on anything that is not GGUF
        raise RopeliteError(f"cannot read {gguf_path} as GGUF: {e}") from e
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise RopeliteError(f"{gguf_path.name}: architecture {arch!r} is not supported (only 'llama')")

    config = _hf_config(meta, reader, gguf_path)
    tensors = _hf_tensors(reader, config, gguf_path)
    tokenizer_files = _tokenizer_files(meta, gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
        for file_name, text in tokenizer_files.items():
            (tmp / file_name).write_text(text)
        # mkdtemp makes a private (0700) directory; the result is an ordinary shareable model directory
        os.chmod(tmp, 0o755)
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _meta_int(meta, key, path, default=None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise RopeliteError(f"{path.name}: GGUF metadata key {key} is missing")
    if not isinstance(value, (int, np.integer)):  # per-layer arrays (other architectures) are not LLaMa
        raise RopeliteError(f"{path.name}: GGUF metadata key {key} is {value!r}, expected one integer")
    return int(value)


def _f32(value) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _hf_config(meta, reader, path) -> dict:
    """HF LlamaConfig fields from llama.cpp's `llama.*` metadata keys."""
    hidden = _meta_int(meta, "llama.embedding_length", path)
    n_heads = _meta_int(meta, "llama.attention.head_count", path)
    head_dim = _meta_int(meta, "llama.attention.key_length", path, default=hidden // n_heads)
    rotary_dim = _meta_int(meta, "llama.rope.dimension_count", path, default=head_dim)
    if rotary_dim != head_dim:
        raise RopeliteError(f"{path.name}: partial rotary (rope dims {rotary_dim} != head_dim {head_dim}) unsupported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise RopeliteError(f"{path.name}: baked-in rope_freqs (Llama-3.1 scaling) is not supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise RopeliteError(f"{path.name}: no token_embd.weight tensor")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(embd.shape[1]),  # GGUF shapes are fastest-first: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": _meta_int(meta, "llama.feed_forward_length", path),
        "num_hidden_layers": _meta_int(meta, "llama.block_count", path),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _meta_int(meta, "llama.attention.head_count_kv", path, default=n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),  # llama.cpp's default base
        "max_position_embeddings": _meta_int(meta, "llama.context_length", path),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    # A GGUF of an already-extended model records its scaling; keep it in HF's rope_scaling form.
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        config["rope_scaling"] = {"rope_type": scaling, "factor": _f32(meta["llama.rope.scaling.factor"])}
        if "llama.rope.scaling.original_context_length" in meta:
            config["rope_scaling"]["original_max_position_embeddings"] = int(
                meta["llama.rope.scaling.original_context_length"])
    return config


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows from GGUF's Meta order (rotary pairs adjacent) to HF's halves order.

    Inside one head, GGUF row 2i + c (pair i, member c) holds what HF keeps at row c * head_dim/2 + i.
    """
    out_features, in_features = w.shape
    # (out, in) -> (heads, head_dim/2, 2, in) -> (heads, 2, head_dim/2, in) -> (out, in)
    w = w.reshape(n_heads, out_features // n_heads // 2, 2, in_features).swapaxes(1, 2)
    return w.reshape(out_features, in_features)


def _hf_tensors(reader, config, path) -> dict[str, torch.Tensor]:
    tensors = {}
    for t in reader.tensors:
        hf_name = _TOP_NAMES.get(t.name)
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if match and match.group(2) in _BLOCK_NAMES:
            hf_name = f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"
        if hf_name is None:
            raise RopeliteError(f"{path.name}: unexpected tensor {t.name} for a LLaMa model")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise RopeliteError(f"{path.name}: cannot dequantise {t.name} of type {t.tensor_type.name}") from e
        # GGUF lists dimensions fastest-first ([in, out]); numpy/torch list them slowest-first ([out, in])
        w = np.array(w, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        if t.name.endswith("attn_q.weight"):
            w = _unpermute_rows(w, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute_rows(w, config["num_key_value_heads"])
        tensors[hf_name] = torch.from_numpy(w)
    return tensors


def _tokenizer_files(meta, path) -> dict[str, str]:
    """tokenizer.json + tokenizer_config.json text for GGUF's embedded byte-level BPE ("gpt2") vocabulary."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        # sentencepiece ("llama") vocabularies store scores, not merges: rebuilding them is out of scope
        print(f"ropelite: {path.name}: tokenizer model {kind!r} not converted; copy the model's tokenizer files "
              f"into the output directory", file=sys.stderr)
        return {}
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex + byte map
    if pre == "smollm":  # llama.cpp's "smollm": every digit is its own word, then GPT-2's regex
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt-2", "gpt2"):
        pre_tokenizer = byte_level
    elif pre in ("llama-bpe", "llama3"):
        pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise RopeliteError(f"{path.name}: unsupported GGUF pre-tokenizer {pre!r}")

    # Llama-3 looks whole words up in the vocabulary before merging (HF "ignore_merges")
    bpe = models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges,
                     ignore_merges=pre in ("llama-bpe", "llama3"))
    tokenizer = HFTokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) must be matched whole in the text, never split into bytes
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind in enumerate(types) if kind == _CONTROL])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i, kind in enumerate(types) if kind == _USER_DEFINED])

    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp adds BOS unless told not to
    if add_bos and bos_id is not None:  # make tokenizer.json say so too, as HF's Llama-3 file does
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "bos_token": None if bos_id is None else tokens[bos_id],
        "eos_token": None if eos_id is None else tokens[eos_id],
        "clean_up_tokenization_spaces": False,
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return {"tokenizer.json": tokenizer.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n"}
