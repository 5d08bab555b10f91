"""Convert a LLaMa-architecture GGUF file (llama.cpp's format) into a Hugging Face-style model directory.

The output is what `ropelite.model.load_model` reads: `config.json`, the weights as safetensors (HF tensor
names, HF "halves" rotary layout; `model.safetensors`, or shards + `model.safetensors.index.json` when large)
and the tokenizer: `tokenizer.json` for byte-level BPE ("gpt2") vocabularies, `tokenizer.model` for
sentencepiece ("llama": LLaMa-2, Mistral) ones.

Weights are written in float32 by default because dequantised Q4/Q8 values (block scale x integer, computed in
float32) are not exactly representable in bf16/fp16; `dtype=torch.bfloat16` halves the output (exact for a
BF16 GGUF, as float16 is for an F16 one). Tensors are dequantised one at a time and written shard by shard, so
memory stays near one shard, whatever the model's size.
"""

import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import sentencepiece
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from ropelite.errors import RopeliteError
from ropelite.hf import shard_groups, shard_names, write_shard_index
from ropelite.rope import adjacent_to_halves, llama3_inv_freq, rope_inv_freq

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


# The most a conversion holds in memory at once (plus the one tensor being dequantised), in the output dtype
_SHARD_BYTES = 2 << 30
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def convert_gguf(gguf_path, out_dir, dtype: torch.dtype = torch.float32, max_shard_bytes: int = _SHARD_BYTES) -> Path:
    """Convert `gguf_path` into the HF-style directory `out_dir` (which must not exist yet); returns out_dir.

    Weights are written in `dtype` (float32, bfloat16 or float16), in safetensors files of at most
    `max_shard_bytes` each. The directory is built next to out_dir under a temporary name and renamed at the
    end, so an interrupted conversion never leaves a half-written out_dir behind.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in _DTYPES:
        raise RopeliteError(f"GGUF conversion dtype must be one of {', '.join(_DTYPES.values())}, got {dtype}")
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

    config = {**_hf_config(meta, reader, gguf_path), "torch_dtype": _DTYPES[dtype]}
    weights = _weight_names(reader, gguf_path)  # every tensor name checked before anything is written
    tokenizer_files = _tokenizer_files(meta, gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file_name, data in tokenizer_files.items():
            (tmp / file_name).write_bytes(data)
        _write_weights(weights, config, dtype, max_shard_bytes, tmp, gguf_path)
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
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise RopeliteError(f"{path.name}: no token_embd.weight tensor")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(by_name["token_embd.weight"].shape[1]),  # GGUF shapes are fastest-first: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": _meta_int(meta, "llama.feed_forward_length", path),
        "num_hidden_layers": _meta_int(meta, "llama.block_count", path),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _meta_int(meta, "llama.attention.head_count_kv", path, default=n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),  # llama.cpp's default base
        "max_position_embeddings": _meta_int(meta, "llama.context_length", path),
        "tie_word_embeddings": "output.weight" not in by_name,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    scaling = _rope_scaling(meta, by_name, head_dim, config["rope_theta"], path)
    return config if scaling is None else {**config, "rope_scaling": scaling}


def _rope_scaling(meta, by_name, head_dim, base, path) -> dict | None:
    """HF's rope_scaling of a GGUF whose RoPE is not plain: Llama 3.1/3.2's rope_freqs tensor (llama.cpp bakes
    llama3 into per-pair divisors), or the `rope.scaling.*` keys of an already-extended model."""
    if "rope_freqs.weight" in by_name:
        scaling = llama3_scaling_from_factors(_dequantize(by_name["rope_freqs.weight"], path), head_dim, base)
        if scaling is None:
            raise RopeliteError(f"{path.name}: its rope_freqs.weight (per-pair RoPE divisors) is not a llama3 RoPE "
                                f"that ropelite can rebuild; convert the original Hugging Face checkpoint instead")
        return scaling
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind in ("none", None):
        return None
    if "llama.rope.scaling.factor" not in meta:
        raise RopeliteError(f"{path.name}: GGUF metadata has rope scaling {kind!r} but no llama.rope.scaling.factor")
    scaling = {"rope_type": kind, "factor": _f32(meta["llama.rope.scaling.factor"])}
    if "llama.rope.scaling.original_context_length" in meta:
        scaling["original_max_position_embeddings"] = int(meta["llama.rope.scaling.original_context_length"])
    return scaling


def llama3_scaling_from_factors(factors, dim: int, base: float) -> dict | None:
    """The HF `rope_scaling` of Llama 3.1's RoPE behind llama.cpp's `rope_freqs` divisors, or None if none fits.

    llama.cpp bakes the llama3 RoPE into per-pair divisors f_i = theta_i / theta'_i: 1 for short wavelengths,
    s for long ones, and 1 / ((1 - smooth_i)/s + smooth_i) in between, where smooth_i = (L/lambda_i - low) /
    (high - low) is linear in 1/lambda_i = theta_i / 2 pi. So s and a line through the blended pairs give
    L/(high - low) and low/(high - low): the two wavelength thresholds, not L itself. As in all Llama 3.1 and 3.2
    releases, low_freq_factor = 1 (L is the longer threshold). The result is accepted only if
    `llama3_inv_freq` reproduces every f_i to float32 precision.
    """
    f = np.asarray(factors, dtype=np.float64)
    theta = rope_inv_freq(dim, base).numpy()  # (d/2,)
    if f.shape != theta.shape:
        return None
    s = float(f.max())
    blended = (f > 1) & (f < s)
    if blended.sum() < 2:  # a line needs two points
        return None
    smooth = (1 / f[blended] - 1 / s) / (1 - 1 / s)
    slope, intercept = np.polyfit(theta[blended] / (2 * math.pi), smooth, 1)  # L/(high-low), -low/(high-low)
    if not intercept < 0:
        return None
    high = float(f"{1 - 1 / intercept:.6g}")  # low = 1, so high - low = -1/intercept
    original_max = round(-slope / intercept)
    rebuilt = theta / llama3_inv_freq(dim, base, s, original_max, 1.0, high).numpy()
    if not np.allclose(rebuilt, f, rtol=1e-6, atol=0):  # float32 keeps ~7 digits; a wrong fit is far off
        return None
    return {"rope_type": "llama3", "factor": s, "low_freq_factor": 1.0, "high_freq_factor": high,
            "original_max_position_embeddings": original_max}


def _weight_names(reader, path) -> list[tuple]:
    """(GGUF tensor, HF name) for every weight; rope_freqs is not a weight (`_hf_config` reads it)."""
    weights = []
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        hf_name = _TOP_NAMES.get(t.name)
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if match and match.group(2) in _BLOCK_NAMES:
            hf_name = f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"
        if hf_name is None:
            raise RopeliteError(f"{path.name}: unexpected tensor {t.name} for a LLaMa model")
        weights.append((t, hf_name))
    return weights


def _dequantize(t, path) -> np.ndarray:
    """One GGUF tensor as float32, slowest dimension first (GGUF lists shapes fastest-first: [in, out])."""
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise RopeliteError(f"{path.name}: cannot dequantise {t.name} of type {t.tensor_type.name}") from e
    return np.array(w, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))


def _hf_tensor(t, config, path) -> torch.Tensor:
    """One weight in HF layout, float32: q/k rows go from GGUF's adjacent rotary pairs to HF's halves."""
    w = torch.from_numpy(_dequantize(t, path))
    if t.name.endswith("attn_q.weight"):
        w = adjacent_to_halves(w, config["num_attention_heads"])
    elif t.name.endswith("attn_k.weight"):
        w = adjacent_to_halves(w, config["num_key_value_heads"])
    return w


def _write_weights(weights, config, dtype, max_shard_bytes, out: Path, path) -> None:
    """Dequantise and write the weights shard by shard: `model.safetensors`, or numbered shards + an index."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [int(t.n_elements) * itemsize for t, _ in weights]
    groups = shard_groups(sizes, max_shard_bytes)
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"converting {path.name}", disable=None) as bar:
        for file_name, group in zip(shard_names(len(groups)), groups):
            tensors = {}
            for t, name in (weights[i] for i in group):
                tensors[name] = _hf_tensor(t, config, path).to(dtype)
                bar.update(tensors[name].nbytes)
            save_file(tensors, str(out / file_name), metadata={"format": "pt", "source": path.name})
    write_shard_index(out, [name for _, name in weights], groups, sum(sizes))


def _tokenizer_files(meta, path) -> dict[str, bytes]:
    """The tokenizer files of GGUF's embedded vocabulary; none (with a warning) for what cannot be rebuilt."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return _bpe_files(meta, path)
    if kind == "llama":
        return _sentencepiece_files(meta, path)
    return _no_tokenizer(path, f"tokenizer model {kind!r} is not supported")


def _no_tokenizer(path, reason: str) -> dict:
    """The weights still convert; say once what is missing and how to complete the directory."""
    print(f"ropelite: {path.name}: weights converted, tokenizer not ({reason}); copy the model's tokenizer files "
          f"into the converted directory", file=sys.stderr)
    return {}


def _tokenizer_config(meta, tokens, tokenizer_class: str) -> bytes:
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    config = {
        "tokenizer_class": tokenizer_class,
        "add_bos_token": _add_bos(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": None if bos_id is None else tokens[bos_id],
        "eos_token": None if eos_id is None else tokens[eos_id],
        "clean_up_tokenization_spaces": False,
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return (json.dumps(config, indent=2) + "\n").encode()


def _add_bos(meta) -> bool:
    return bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp adds BOS unless told not to


def _bpe_files(meta, path) -> dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json for GGUF's byte-level BPE ("gpt2") vocabulary."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = _merges(meta.get("tokenizer.ggml.merges", []), vocab, path)
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
        return _no_tokenizer(path, f"unsupported GGUF pre-tokenizer {pre!r}")

    # Llama-3 looks whole words up in the vocabulary before merging (HF "ignore_merges")
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in ("llama-bpe", "llama3")))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) must be matched whole in the text, never split into bytes
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind in enumerate(types) if kind == _CONTROL])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i, kind in enumerate(types) if kind == _USER_DEFINED])
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if _add_bos(meta) and bos_id is not None:  # make tokenizer.json say so too, as HF's Llama-3 file does
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return {"tokenizer.json": tokenizer.to_str(pretty=True).encode(),
            "tokenizer_config.json": _tokenizer_config(meta, tokens, "PreTrainedTokenizerFast")}


def _merges(lines, vocab, path) -> list[tuple[str, str]]:
    """GGUF's "left right" merge lines as pairs; each part and the merged token must be in the vocabulary
    (tokenizers would otherwise panic with a Rust backtrace)."""
    merges = []
    for n, line in enumerate(lines):
        parts = line.split(" ")
        missing = next((p for p in (*parts, "".join(parts)) if p not in vocab), None) if len(parts) == 2 else line
        if missing is not None:
            raise RopeliteError(f"{path.name}: GGUF merge #{n} {line!r} is unusable: {missing!r} is not in the "
                                f"vocabulary")
        merges.append((parts[0], parts[1]))
    return merges


# sentencepiece's ModelProto (sentencepiece_model.proto), the fields a BPE tokenizer.model needs
_SP_PIECES, _SP_TRAINER, _SP_NORMALIZER = 1, 2, 3
_SP_PIECE, _SP_SCORE, _SP_TYPE = 1, 2, 3
_SP_MODEL_TYPE, _SP_VOCAB_SIZE, _SP_BYTE_FALLBACK = 3, 4, 35
_SP_UNK_ID, _SP_BOS_ID, _SP_EOS_ID, _SP_UNK_PIECE, _SP_BOS_PIECE, _SP_EOS_PIECE = 40, 41, 42, 45, 46, 47
_SP_NAME, _SP_CHARSMAP, _SP_DUMMY_PREFIX, _SP_REMOVE_SPACES, _SP_ESCAPE_SPACES = 1, 2, 3, 4, 5
_SP_BPE, _SP_NORMAL, _SP_UNKNOWN, _SP_BYTE = 2, 1, 2, 6  # GGUF's token types are sentencepiece's


def _sentencepiece_files(meta, path) -> dict[str, bytes]:
    """tokenizer.model + tokenizer_config.json for GGUF's sentencepiece ("llama") vocabulary.

    The GGUF keeps everything a sentencepiece BPE model encodes with: pieces, their scores (merge priority),
    their types (control, byte, ...), and the normalizer switches. Rebuilding the ModelProto from them lets
    sentencepiece itself encode, exactly as the original tokenizer.model did.
    """
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type")
    if scores is None or types is None or not len(tokens) == len(scores) == len(types):
        return _no_tokenizer(path, "its 'llama' vocabulary lacks per-token scores or types")
    first_unknown = next((i for i, kind in enumerate(types) if kind == _SP_UNKNOWN), None)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", first_unknown)
    if unk_id is None:
        return _no_tokenizer(path, "its 'llama' vocabulary has no unknown token")
    pieces = b"".join(_proto_field(_SP_PIECES, _proto_field(_SP_PIECE, tok) + _proto_field(_SP_SCORE, float(score))
                                   + _proto_field(_SP_TYPE, int(kind) or _SP_NORMAL))  # type 0 = undefined
                      for tok, score, kind in zip(tokens, scores, types))
    trainer = (_proto_field(_SP_MODEL_TYPE, _SP_BPE) + _proto_field(_SP_VOCAB_SIZE, len(tokens))
               + _proto_field(_SP_BYTE_FALLBACK, _SP_BYTE in types)
               + _proto_field(_SP_UNK_ID, unk_id) + _proto_field(_SP_UNK_PIECE, tokens[unk_id]))
    for id_key, piece_key, gguf_key in ((_SP_BOS_ID, _SP_BOS_PIECE, "tokenizer.ggml.bos_token_id"),
                                        (_SP_EOS_ID, _SP_EOS_PIECE, "tokenizer.ggml.eos_token_id")):
        if meta.get(gguf_key) is not None:
            trainer += _proto_field(id_key, meta[gguf_key]) + _proto_field(piece_key, tokens[meta[gguf_key]])
    charsmap = bytes(meta.get("tokenizer.ggml.precompiled_charsmap", []))
    normalizer = (_proto_field(_SP_NAME, "precompiled" if charsmap else "identity")
                  + _proto_field(_SP_CHARSMAP, charsmap)
                  # llama.cpp's defaults for a "llama" vocabulary, which are LLaMa-2's tokenizer.model settings
                  + _proto_field(_SP_DUMMY_PREFIX, bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
                  + _proto_field(_SP_REMOVE_SPACES, bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False)))
                  + _proto_field(_SP_ESCAPE_SPACES, True))
    model = (pieces + _proto_field(_SP_TRAINER, trainer) + _proto_field(_SP_NORMALIZER, normalizer))
    try:
        sentencepiece.SentencePieceProcessor(model_proto=model)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with its C++ status text
        raise RopeliteError(f"{path.name}: its 'llama' vocabulary is not a valid sentencepiece model: {e}") from e
    return {"tokenizer.model": model, "tokenizer_config.json": _tokenizer_config(meta, tokens, "LlamaTokenizer")}


def _proto_field(number: int, value) -> bytes:
    """One protobuf field: text/bytes length-delimited, float as 32-bit, bool/int as a varint (negative ints
    in 64-bit two's complement, as protobuf's int32 does)."""
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value) & (1 << 64) - 1)


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint: 7 bits a byte, low bits first, the high bit set on all but the last."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
