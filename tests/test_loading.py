"""Loading and saving Hugging Face LLaMa directories: strict names and shapes, sharding, dtypes, one-line errors,
the RoPE record in config.json, and transformers itself as the oracle (both directions) when it is installed."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from ropelite.errors import RopeliteError
from ropelite.hf import config_from_hf, load_model, save_model
from ropelite.rope import ROPE_TYPES, RopeConfig

L = 32
SHORT = (1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 2.0, 2.0)      # longrope per-pair factors for head_dim 16
LONG = (1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 4.0, 4.0)


def ids_for(T, seed=0):
    return torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(seed))


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ids = ids_for(40)
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def one_line_error(fn, *words):
    with pytest.raises(RopeliteError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


# --------------------------------------------------------------------------------------------------------------
# The Hugging Face layout
# --------------------------------------------------------------------------------------------------------------

def hand_written_checkpoint(path, layers=2, hidden=64, heads=4, kv=2, head_dim=16, ffn=128, vocab=97):
    """What a transformers LLaMa checkpoint holds, written without ropelite (4.x config form)."""
    g = torch.Generator().manual_seed(5)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                       p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
                       p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                       p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn)})
    tensors = {k: torch.randn(*s, generator=g) * 0.2 for k, s in shapes.items()}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(head_dim // 2)  # old checkpoints carry it
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 128, "rope_theta": 5e5, "rope_scaling": None,
              "tie_word_embeddings": False, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    return tensors, config


def test_hand_written_hf_checkpoint_loads_and_runs(tmp_path):
    tensors, _ = hand_written_checkpoint(tmp_path)
    model = load_model(tmp_path)
    c = model.config
    assert (c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.rms_norm_eps) == (2, 2, 16, 1e-6)
    assert c.rope == RopeConfig(type="rope", theta=5e5, original_max_position_embeddings=128)
    state = model.state_dict()
    for name, tensor in tensors.items():
        if not name.endswith("inv_freq"):
            assert torch.equal(state[name.removeprefix("model.")], tensor), name
    with torch.no_grad():
        logits = model(ids_for(20))
    assert logits.shape == (1, 20, 97) and logits.isfinite().all()


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_is_bit_identical(tiny_llama, tmp_path, tied):
    rope = RopeConfig(type="yarn", theta=5e5, factor=4.0, beta_fast=16.0, original_max_position_embeddings=L)
    model = tiny_llama(rope=rope, tie_word_embeddings=tied)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    # max_position_embeddings is written as transformers reads it: the extended length L * s
    assert json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"] == 4 * L
    assert_same_model(model, loaded)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert ("lm_head.weight" in names) != tied and "model.embed_tokens.weight" in names


def test_sharded_equals_single_file(tiny_llama, tmp_path):
    model = tiny_llama()
    save_model(model, tmp_path / "single")
    save_model(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    assert all(len(load_file(str(tmp_path / "sharded" / s))) >= 1 for s in shards)
    assert_same_model(load_model(tmp_path / "single"), load_model(tmp_path / "sharded"))
    save_model(model, tmp_path / "sharded")       # re-saved whole: the stale index must not shadow it
    assert not (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "sharded" / shards[0]).unlink()   # leftovers are harmless; a missing shard is an error
    save_model(model, tmp_path / "again", max_shard_bytes=40_000)
    (tmp_path / "again" / shards[1]).unlink()
    one_line_error(lambda: load_model(tmp_path / "again"), shards[1], "missing")


def test_fp16_on_disk_loads_as_fp32(tiny_llama, tmp_path):
    model = tiny_llama().half()
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float16"
    assert all(t.dtype == torch.float16 for t in load_file(str(tmp_path / "model.safetensors")).values())
    loaded = load_model(tmp_path, dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == torch.float32 and torch.equal(got, tensor.float()), name


# --------------------------------------------------------------------------------------------------------------
# Strictness and one-line errors
# --------------------------------------------------------------------------------------------------------------

def edit_tensors(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_strict_names_and_shapes(tiny_llama, tmp_path):
    save_model(tiny_llama(), tmp_path)
    key = "model.layers.1.mlp.up_proj.weight"
    edit_tensors(tmp_path, lambda t: t.pop(key))
    one_line_error(lambda: load_model(tmp_path), "missing", key)

    save_model(tiny_llama(), tmp_path)
    edit_tensors(tmp_path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
    one_line_error(lambda: load_model(tmp_path), "unexpected", "model.layers.0.mlp.extra.weight")

    save_model(tiny_llama(), tmp_path)
    edit_tensors(tmp_path, lambda t: t.update({key: torch.ones(128, 63)}))
    one_line_error(lambda: load_model(tmp_path), key, "(128, 63)", "(128, 64)")


def test_bad_input_is_one_line(tiny_llama, tmp_path):
    one_line_error(lambda: load_model(tmp_path / "nope"), "no such model", "nope")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load_model(tmp_path / "empty"), "config.json")

    def with_config(name, change):
        d = tmp_path / name
        save_model(tiny_llama(), d)
        config = json.loads((d / "config.json").read_text())
        change(config)
        (d / "config.json").write_text(json.dumps(config))
        return d

    gpt2 = with_config("gpt2", lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    one_line_error(lambda: load_model(gpt2), "gpt2")
    unknown = with_config("unknown", lambda c: c.update(rope_scaling={"rope_type": "xpos", "factor": 2.0}))
    one_line_error(lambda: load_model(unknown), "xpos", "linear", "dynamic", "yarn", "llama3", "longrope")
    save_model(tiny_llama(), tmp_path / "ok")
    one_line_error(lambda: load_model(tmp_path / "ok", rope="xpos"), "xpos", *ROPE_TYPES)
    shrink = with_config("shrink", lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 0.5}))
    one_line_error(lambda: load_model(shrink), "factor", "0.5")
    one_line_error(lambda: load_model(tmp_path / "ok", rope="pi", factor=0.5), "factor", "0.5")
    no_key = with_config("no_key", lambda c: c.pop("hidden_size"))
    one_line_error(lambda: load_model(no_key), "hidden_size")
    for act in ("gelu", "relu", None):  # SwiGLU is silu (alias swish); anything else gives wrong logits
        other = with_config(f"act_{act}", lambda c: c.update(hidden_act=act))
        one_line_error(lambda: load_model(other), "hidden_act", str(act))
    swish = with_config("swish", lambda c: c.update(hidden_act="swish"))
    assert load_model(swish).config == load_model(tmp_path / "ok").config
    no_arch = with_config("no_arch", lambda c: c.update(model_type="mistral", architectures=None))
    one_line_error(lambda: load_model(no_arch), "mistral")

    corrupt = tmp_path / "corrupt"
    save_model(tiny_llama(), corrupt)
    (corrupt / "config.json").write_text('{"model_type": "llama", ')
    one_line_error(lambda: load_model(corrupt), "config.json", "JSON")

    truncated = tmp_path / "truncated"
    save_model(tiny_llama(), truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(lambda: load_model(truncated), "model.safetensors")


# --------------------------------------------------------------------------------------------------------------
# The RoPE record in config.json
# --------------------------------------------------------------------------------------------------------------

def test_rope_override_keeps_pretrained_base_and_length(tiny_llama, tmp_path):
    rope = RopeConfig(type="yarn", theta=5e5, factor=2.0, beta_fast=16.0, original_max_position_embeddings=L)
    save_model(tiny_llama(rope=rope), tmp_path)
    pi = load_model(tmp_path, rope="pi", factor=4.0).config.rope
    assert pi == RopeConfig(type="pi", theta=5e5, factor=4.0, original_max_position_embeddings=L)
    ntk = load_model(tmp_path, rope="ntk", base=1e6).config.rope
    assert (ntk.type, ntk.theta, ntk.base, ntk.original_max_position_embeddings) == ("ntk", 5e5, 1e6, L)
    # the checkpoint's own variant, named or not, keeps its settings; a new factor changes only the factor
    assert load_model(tmp_path, rope="yarn").config.rope == rope
    assert load_model(tmp_path, factor=8.0).config.rope == rope.replace(factor=8.0)
    assert load_model(tmp_path, beta_fast=64.0).config.rope == rope.replace(beta_fast=64.0)


HF_FORMS = {  # type: (rope_scaling of transformers 4.x, max_position_embeddings)
    "rope": ({"rope_type": "default"}, 64),
    "pi": ({"rope_type": "linear", "factor": 2.0}, 64),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, L),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L, "beta_fast": 16.0,
              "attention_factor": 1.25}, 4 * L),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": L,
                "low_freq_factor": 2.0, "high_freq_factor": 8.0}, 8 * L),
    "longrope": ({"rope_type": "longrope", "factor": 2.0, "original_max_position_embeddings": L,
                  "short_factor": list(SHORT), "long_factor": list(LONG)}, 2 * L),
}


@pytest.mark.parametrize("kind", sorted(HF_FORMS))
def test_rope_parameters_read_like_rope_scaling(kind):
    scaling, max_len = HF_FORMS[kind]
    base = {"model_type": "llama", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": max_len}
    v4 = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": scaling})
    v5 = config_from_hf({**base, "rope_parameters": {**scaling, "rope_theta": 5e5}})
    assert v4 == v5
    assert v4.rope.type == kind and v4.rope.theta == 5e5
    assert v4.rope.factor == scaling.get("factor", 1.0)
    legacy = {k if k != "rope_type" else "type": v for k, v in scaling.items()}   # the pre-4.45 key
    assert config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": legacy}) == v4


@pytest.mark.parametrize("rope", [RopeConfig(type="ntk", theta=1e4, factor=4.0, original_max_position_embeddings=L),
                                  RopeConfig(type="ntk", theta=1e4, base=1e6, original_max_position_embeddings=L)])
def test_ntk_record_round_trips(tiny_llama, tmp_path, rope):
    save_model(tiny_llama(rope=rope), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    expected_base = 1e6 if rope.base else 1e4 * 4.0 ** (16 / 14)
    assert config["rope_theta"] == pytest.approx(expected_base, rel=1e-12)   # what transformers runs
    assert config["rope_scaling"] is None and config["ropelite"]["rope"] == "ntk"
    assert load_model(tmp_path).config.rope == rope


# --------------------------------------------------------------------------------------------------------------
# transformers as the oracle
# --------------------------------------------------------------------------------------------------------------

def peaked_init(model, seed=0):
    """Large q/k weights (peaked attention: a RoPE mistake changes the logits), O(1) logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "q_proj" in name or "k_proj" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1] if "embed" not in name else 1))
    return model


HF_CASES = {  # name: (rope_parameters without rope_theta, max_position_embeddings)
    "default": ({"rope_type": "default"}, L),
    "linear": ({"rope_type": "linear", "factor": 2.0}, 2 * L),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, L),
    # transformers' dynamic ignores a pretrained length in rope_parameters and scales from max_position_embeddings
    "dynamic_stray_key": ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": L // 2}, L),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}, 4 * L),
    "yarn_options": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L, "beta_fast": 8.0,
                      "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5}, 4 * L),
    "llama3": ({"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": L,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 4 * L),
    "longrope": ({"rope_type": "longrope", "factor": 2.0, "original_max_position_embeddings": L,
                  "short_factor": list(SHORT), "long_factor": list(LONG)}, 2 * L),
    "longrope_no_factor": ({"rope_type": "longrope", "original_max_position_embeddings": L,   # Phi-3 style
                            "short_factor": list(SHORT), "long_factor": list(LONG)}, 4 * L),
}
T = 48  # past L = 32: dynamic recomputes its base, longrope switches to the long factors


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_transformers_checkpoint_loads_with_the_same_logits(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    parameters, max_len = HF_CASES[case]
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=max_len, tie_word_embeddings=case == "yarn",
        rope_parameters={**parameters, "rope_theta": 1e4})
    hf = peaked_init(transformers.LlamaForCausalLM(config)).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = ids_for(T)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
        plain = load_model(tmp_path, rope="rope")(ids)
    # transformers forms inv_freq and the angles in fp32, we in fp64: they differ by ~T * 1e-7 rad
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if case != "default":  # the variant matters at this length, so the comparison above checks it
        assert (plain - expected).abs().max() > 1e-2


ROUND_TRIP = {
    "rope": RopeConfig(type="rope", theta=1e4, original_max_position_embeddings=L),
    "pi": RopeConfig(type="pi", theta=1e4, factor=2.0, original_max_position_embeddings=L),
    "ntk": RopeConfig(type="ntk", theta=1e4, factor=4.0, original_max_position_embeddings=L),
    "ntk_base": RopeConfig(type="ntk", theta=1e4, base=1e6, original_max_position_embeddings=L),
    "dynamic": RopeConfig(type="dynamic", theta=1e4, factor=2.0, original_max_position_embeddings=L),
    "yarn": RopeConfig(type="yarn", theta=1e4, factor=4.0, original_max_position_embeddings=L),
    "yarn_options": RopeConfig(type="yarn", theta=1e4, factor=4.0, beta_fast=8.0, beta_slow=2.0,
                               attention_factor=1.3, original_max_position_embeddings=L),
    "llama3": RopeConfig(type="llama3", theta=1e4, factor=4.0, original_max_position_embeddings=L),
    "longrope": RopeConfig(type="longrope", theta=1e4, factor=2.0, short_factor=SHORT, long_factor=LONG,
                           original_max_position_embeddings=L),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIP))
def test_saved_config_means_the_same_rope_to_transformers(tiny_llama, tmp_path, case):
    """save_model -> transformers' from_pretrained gives our logits: config.json says exactly which RoPE ran."""
    transformers = pytest.importorskip("transformers")
    ours = tiny_llama(rope=ROUND_TRIP[case], tie_word_embeddings=case == "pi")
    save_model(ours, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = ids_for(T)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_every_variant_round_trips_through_config_json():
    """config_to_hf then config_from_hf gives back the same RopeConfig, for every variant of the table."""
    from ropelite.hf import config_to_hf
    from ropelite.model import LlamaConfig
    assert {r.type for r in ROUND_TRIP.values()} == set(ROPE_TYPES)   # a new variant needs a case here
    for case, rope in ROUND_TRIP.items():
        config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope=rope)
        assert config_from_hf(json.loads(json.dumps(config_to_hf(config)))) == config, case


def test_a_new_variant_is_one_function_and_one_table_entry(monkeypatch, tiny_llama, tmp_path):
    """Two variants that exist only in this test, registered in the table and nowhere else, run through
    RopeConfig, the model, the factor rule of the scripts, and config.json both ways: one that transformers
    would name (PI on the slow half of the pairs), one it runs as plain RoPE at a new base (b' = b s^2)."""
    from ropelite import cli
    from ropelite.hf import config_to_hf
    from ropelite.rope import VARIANTS, RopeVariant, pi_inv_freq, rope_inv_freq

    def half_pi(c, dim, seq_len):
        theta = rope_inv_freq(dim, c.theta)
        return torch.cat([theta[: dim // 4], pi_inv_freq(dim, c.theta, c.factor)[dim // 4:]])

    monkeypatch.setitem(VARIANTS, "halfpi", RopeVariant("halfpi", half_pi, hf_type="half_linear",
                                                        hf_length="rope_scaling"))
    monkeypatch.setitem(VARIANTS, "square", RopeVariant(
        "square", lambda c, d, n: rope_inv_freq(d, c.theta * c.factor ** 2), hf_type=None, changes_base=True,
        plain_base=lambda c, d: c.theta * c.factor ** 2))
    half = RopeConfig(type="halfpi", theta=1e4, factor=4.0, original_max_position_embeddings=L)
    theta = torch.tensor([1e4 ** (-2 * i / 16) for i in range(8)], dtype=torch.float64)
    freqs, attention = half.frequencies(16, 10)
    torch.testing.assert_close(freqs, torch.cat([theta[:4], theta[4:] / 4]), rtol=1e-12, atol=0)
    assert attention == 1.0 and half.describe() == "halfpi x4"
    plain = tiny_llama(rope=RopeConfig(theta=1e4, original_max_position_embeddings=L))
    with pytest.raises(RopeliteError, match="--rope halfpi needs --factor"):
        cli.variant_config(plain.config, "halfpi", None, None, ["halfpi"])
    for rope in (half, RopeConfig(type="square", theta=1e4, factor=3.0, original_max_position_embeddings=L)):
        config = plain.config.with_rope(rope.type, rope.factor)
        assert config.rope == rope
        written = config_to_hf(config)
        assert config_from_hf(written) == config
        model = tiny_llama(rope=rope)
        save_model(model, tmp_path / rope.type)
        assert_same_model(model, load_model(tmp_path / rope.type))
    assert written["rope_theta"] == 9e4 and written["rope_scaling"] is None   # square: plain RoPE at b s^2
    scaling = config_to_hf(plain.config.with_rope("halfpi", 4.0))["rope_scaling"]
    assert scaling == {"rope_type": "half_linear", "type": "half_linear", "factor": 4.0,
                       "original_max_position_embeddings": L}
