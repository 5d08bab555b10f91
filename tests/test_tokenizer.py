"""Tokenizer: sentencepiece (tokenizer.model) and tokenizers (tokenizer.json) backends, BOS rules, chat prompts.

GGUF's embedded BPE (-> tokenizer.json) is tested in test_gguf.py, where a GGUF is written.
"""

import io
import json

import pytest
import sentencepiece
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ropelite.errors import RopeliteError
from ropelite.tokenizer import ByteTokenizer, load_tokenizer

TEXT = ["Rotary position embeddings rotate query and key vectors by an angle that grows with position.",
        "Position interpolation squeezes long inputs into the trained range; NTK changes the base instead.",
        "YaRN mixes both ideas per frequency and rescales the attention temperature."] * 30


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A LLaMa-2-like sentencepiece model (unk 0, <s> 1, </s> 2, 256 byte pieces) trained on a few sentences."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_writer=model, vocab_size=400, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, hard_vocab_limit=False)
    path = tmp_path_factory.mktemp("sp")
    (path / "tokenizer.model").write_bytes(model.getvalue())
    return path


def test_sentencepiece_round_trip_and_bos(sp_dir):
    tok = load_tokenizer(sp_dir)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    text = "Rotary embeddings rotate keys; YaRN rescales attention. Ünïcode falls back to bytes!"
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.add_bos  # no tokenizer_config.json: LLaMa-2's default
    assert tok.encode(text) == [1] + reference.encode(text)
    assert tok.encode(text, add_bos=False) == reference.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == reference.get_piece_size()
    assert tok.chat_template is None
    assert tok.chat("Why rotate?", "Because") == "Why rotate?\nBecause"


def test_sentencepiece_bos_follows_tokenizer_config(sp_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    tok = load_tokenizer(tmp_path)
    assert not tok.add_bos
    assert tok.encode("position")[0] != 1
    assert tok.encode("position", add_bos=True)[0] == 1


def write_bpe_dir(path, post_processor_bos: bool, tokenizer_config: dict | None):
    """A Llama-3-like tokenizer.json: byte-level BPE whose post-processor may prepend <|begin_of_text|>."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if post_processor_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return tok


TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_tokenizer_json_bos_from_post_processor(tmp_path):
    # Llama-3 style: no add_bos_token anywhere, the post-processor says a BOS is prepended
    config = {"bos_token": {"content": "<|begin_of_text|>", "special": True}, "eos_token": "<|eot_id|>",
              "chat_template": TEMPLATE}
    reference = write_bpe_dir(tmp_path / "m", post_processor_bos=True, tokenizer_config=config)
    tok = load_tokenizer(tmp_path / "m")
    text = "YaRN rescales the attention temperature, 42 times!"
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (0, 2, True)
    assert tok.encode(text) == reference.encode(text).ids  # reference adds BOS through its post-processor
    assert tok.encode(text)[0] == 0 and tok.encode(text, add_bos=False)[0] != 0
    assert tok.decode(tok.encode(text)) == text  # BOS is not printed
    # the template writes {{ bos_token }}, encode() adds one too: the prompt must still hold a single BOS
    prompt = tok.chat("Why?", "Because")
    assert prompt == "<|user|>Why?<|eot_id|><|assistant|>Because"
    assert tok.encode(prompt).count(0) == 1 and tok.encode(prompt).count(2) == 1


def test_tokenizer_json_config_overrides_and_no_bos(tmp_path):
    write_bpe_dir(tmp_path / "a", post_processor_bos=True,
                  tokenizer_config={"bos_token": "<|begin_of_text|>", "add_bos_token": False, "chat_template": TEMPLATE})
    tok = load_tokenizer(tmp_path / "a")
    assert not tok.add_bos and tok.encode("position")[0] != 0
    assert tok.chat("Why?") == "<|begin_of_text|><|user|>Why?<|eot_id|><|assistant|>"
    write_bpe_dir(tmp_path / "b", post_processor_bos=False, tokenizer_config={"bos_token": "<|begin_of_text|>"})
    assert not load_tokenizer(tmp_path / "b").add_bos


def test_chat_template_whitespace_rules_match_hugging_face(tmp_path):
    # HF renders with trim_blocks + lstrip_blocks: a newline after a {% tag %} and indentation before one vanish
    template = ("{% for m in messages %}\n[{{ m['content'] }}]\n  {% endfor %}\n"
                "  {% if add_generation_prompt %}\n>{% endif %}")
    write_bpe_dir(tmp_path / "m", post_processor_bos=False, tokenizer_config={"chat_template": template})
    assert load_tokenizer(tmp_path / "m").chat("hi", " ok") == "[hi]\n> ok"


def test_chat_template_file_and_raise_exception(tmp_path):
    write_bpe_dir(tmp_path / "m", post_processor_bos=False, tokenizer_config={})
    (tmp_path / "m" / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('needs a system turn') }}{% endif %}")
    tok = load_tokenizer(tmp_path / "m")
    with pytest.raises(RopeliteError, match="needs a system turn"):
        tok.chat("hi")


def test_missing_and_broken_files(tmp_path):
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(RopeliteError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(RopeliteError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(tmp_path)


def test_byte_tokenizer_is_utf8_bytes_with_eos_256():
    tok = ByteTokenizer()
    assert tok.encode("hé") == [104, 0xC3, 0xA9] and tok.vocab_size == 257 and tok.eos_id == 256
    assert tok.decode([104, 0xC3, 0xA9, 256]) == "hé"   # EOS is not text
