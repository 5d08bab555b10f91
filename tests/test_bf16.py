"""bf16 against fp32: what --dtype auto resolves to and where it is recorded, and the accuracy budget on the real
SmolLM2-135M (marked smollm2), each measured on the same input in both dtypes:

- perplexity at 2K within 0.5 %;
- the last query's attention entropy within 0.02 nats (analyze.py attention's rows, and needle.py's Algorithm 1
  rows of the KV-cache decoding);
- the JS divergence of mean distributions (PI against RoPE, the seed paper's Table 1) within 10 % relative;
- the same passkey answers on a 2 x 2 grid, plain prompt;
- a small model trained from scratch by train.py (bf16 autocast over fp32 weights and AdamW): its held-out loss
  at the end within 1 % of the fp32 run's.

Lengths are short (1K-2K) so the set runs in about a minute on 2 cores; each test prints what it measured.
"""

import json

import numpy as np
import pytest
import torch

import ropelite
import train
from ropelite import attention
from ropelite.cli import NATIVE_BF16, native_bf16, resolve_dtype
from ropelite.data import builtin_documents, tokenize_documents
from ropelite.haystack import MAX_NEW_TOKENS, passkey_cell, passkey_haystack, passkeys
from ropelite.ppl import perplexity
from ropelite.stats import entropy
from ropelite.training import load_trainer_state


# ---------------------------------------------------------------------------------------------------------------
# --dtype auto
# ---------------------------------------------------------------------------------------------------------------

def report_cpu(monkeypatch, onednn_bf16: bool, instructions: tuple[str, ...]):
    """Make PyTorch report a CPU whose oneDNN has (or lacks) bf16 kernels and which has ``instructions``."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    monkeypatch.setattr(torch.cpu, "get_capabilities",
                        lambda: {"architecture": "x86_64", "avx512_f": True, **{name: True for name in instructions}})


@pytest.mark.parametrize("onednn, instructions, expected", [
    (True, ("amx_bf16", "avx512_bf16"), "bf16"),    # Sapphire Rapids
    (True, ("avx512_bf16",), "bf16"),               # Cooper Lake, Zen 4
    (True, ("bf16",), "bf16"),                      # ARM's BF16 extension
    (True, (), "fp32"),                             # AVX512 without bf16 (Skylake): oneDNN emulates it
    (False, ("amx_bf16",), "fp32"),                 # a torch whose oneDNN has no bf16 kernels
])
def test_auto_is_bf16_exactly_where_pytorch_reports_native_bf16(monkeypatch, onednn, instructions, expected):
    report_cpu(monkeypatch, onednn, instructions)
    lines = []
    assert resolve_dtype("auto", "cpu", log=lines.append) == expected
    assert native_bf16("cpu") == (expected == "bf16")
    assert lines == [lines[0]] and lines[0].startswith(f"dtype: {expected} (auto: ")  # one line, saying why
    assert all(name in lines[0] for name in instructions) if expected == "bf16" else "none of" in lines[0]
    assert resolve_dtype(None, "cpu") == expected                    # the old default of the library's callers
    for given in ("fp32", "bf16", "fp16"):                           # a dtype given is what runs, and not logged
        assert resolve_dtype(given, "cpu", log=lines.append) == given
    assert len(lines) == 1


def test_auto_is_bf16_on_cuda_and_fp32_on_other_devices(monkeypatch):
    report_cpu(monkeypatch, False, ())
    assert resolve_dtype("auto", "cuda") == "bf16" and resolve_dtype("auto", "meta") == "fp32"
    assert set(NATIVE_BF16) >= {"amx_bf16", "avx512_bf16", "bf16"}


def test_this_machine_reports_what_auto_reads():
    """Not a budget: the detection runs on the real torch (a missing or renamed API would fail here)."""
    capabilities = torch.cpu.get_capabilities()
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported() and any(capabilities.get(n) for n in NATIVE_BF16)
    assert resolve_dtype("auto", "cpu") == ("bf16" if native else "fp32")


TINY_TRAIN = ["--init", "random", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "2",
              "--len", "32", "--batch-tokens", "64", "--tokens", "192", "--warmup", "1", "--builtin", "prose",
              "--device", "cpu", "--quiet", "--eval-tokens", "0", "--save-every", "1"]


def test_train_records_the_resolved_dtype_and_resume_on_another_cpu_keeps_it(tmp_path, monkeypatch, capsys):
    """A run started under auto on a bf16 CPU stores 'bf16' in its checkpoint; resumed where auto would mean
    fp32, it goes on in bf16 (the run's numbers do not change with the machine)."""
    report_cpu(monkeypatch, True, ("amx_bf16",))
    out = tmp_path / "run"
    train.main(TINY_TRAIN + ["--stop-after", "1", "--out", str(out)])
    assert "dtype: bf16 (auto: this CPU multiplies bf16 natively (amx_bf16))" in capsys.readouterr().err
    assert load_trainer_state(out / "checkpoint")["args"]["dtype"] == "bf16"
    report_cpu(monkeypatch, True, ())                                 # the same run on a CPU without bf16
    train.main(["--resume", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert "process(es); bf16, grad-ckpt" in err and "dtype: fp32" not in err
    assert load_trainer_state(out / "checkpoint")["args"]["dtype"] == "bf16"


def test_eval_ppl_records_the_resolved_dtype_and_does_not_resume_across_it(tiny_llama, tmp_path, monkeypatch, capsys):
    """Results and the resume id hold what auto resolved to: the same --out run where auto means fp32 measures
    its rows anew instead of taking the bf16 ones as done."""
    import eval_ppl
    from ropelite.hf import save_model
    save_model(tiny_llama(), tmp_path / "model")
    (tmp_path / "data").mkdir()
    for i in range(2):
        np.save(tmp_path / "data" / f"doc{i}.npy", np.random.default_rng(i).integers(0, 97, 40))
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--lengths", "16",
            "--device", "cpu", "--out", str(tmp_path / "out")]
    rows = {}
    for native, dtype in ((True, "bf16"), (False, "fp32")):
        report_cpu(monkeypatch, native, ("avx512_bf16",))
        eval_ppl.main(argv)
        assert f"dtype: {dtype} (auto: " in capsys.readouterr().err
        rows[dtype] = [r for r in json.loads((tmp_path / "out" / "ppl.json").read_text()) if r["dtype"] == dtype]
    assert len(rows["bf16"]) == len(rows["fp32"]) == 1                  # measured in each dtype, neither reused
    assert rows["bf16"][0]["ppl"] != rows["fp32"][0]["ppl"]


# ---------------------------------------------------------------------------------------------------------------
# The budget, on SmolLM2
# ---------------------------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def smollm2():
    """{dtype name: the model loaded in that dtype}, and the tokenizer."""
    models = {}
    for name, dtype in DTYPES.items():
        models[name], tokenizer = ropelite.load("smollm2", dtype=dtype)
    return models, tokenizer


@pytest.fixture(scope="module")
def prose(smollm2):
    """The built-in prose documents with at least 2048 SmolLM2 tokens, tokenised."""
    _, tokenizer = smollm2
    docs = tokenize_documents(builtin_documents("prose", min_chars=12_000), tokenizer)
    return [d for d in docs if len(d) >= 2048]


@pytest.mark.smollm2
def test_perplexity_at_2k_within_half_a_percent(smollm2, prose):
    models, _ = smollm2
    ppl = {name: perplexity(model, prose[:2], 2048)["ppl"] for name, model in models.items()}
    change = ppl["bf16"] / ppl["fp32"] - 1
    print(f"PPL at 2048 tokens, 2 documents: fp32 {ppl['fp32']:.4f}, bf16 {ppl['bf16']:.4f} ({100 * change:+.3f} %)")
    assert abs(change) < 0.005


@pytest.fixture(scope="module")
def last_rows(smollm2, prose):
    """{(dtype, variant): [(layers, heads, 1024) last-query rows per sample]}, three samples (distinct
    documents), RoPE and PI x4, each dtype's model; analyze.py attention's path (fast attention, the last row
    formed eagerly)."""
    models, _ = smollm2
    rows = {}
    for name, model in models.items():
        for rope in ("rope", "pi"):
            config = model.config.with_rope(rope, factor=4 if rope == "pi" else None)
            variant = attention.Variant(rope, model, config, 0)
            rows[name, rope] = [attention.last_rows(variant, doc[:1024]) for doc in prose[:3]]
    return rows


@pytest.mark.smollm2
def test_last_query_entropy_within_002_nats(last_rows):
    for rope in ("rope", "pi"):
        mean = {name: float(torch.stack([entropy(r) for r in last_rows[name, rope]]).mean()) for name in DTYPES}
        worst = max(float((entropy(a) - entropy(b)).abs().mean((1,)).max())                  # per layer
                    for a, b in zip(last_rows["bf16", rope], last_rows["fp32", rope]))
        print(f"{rope} at 1024: last-query entropy fp32 {mean['fp32']:.4f}, bf16 {mean['bf16']:.4f} nats "
              f"(largest per-layer mean difference {worst:.4f})")
        assert abs(mean["bf16"] - mean["fp32"]) < 0.02


@pytest.mark.smollm2
def test_js_of_means_pi_vs_rope_within_10_percent(last_rows):
    js = {}
    for name in DTYPES:
        reductions = {rope: attention.Reduction(30, 9, 1024) for rope in ("rope", "pi")}
        for ref, pi in zip(last_rows[name, "rope"], last_rows[name, "pi"]):
            reductions["pi"].add(pi, ref)
            reductions["rope"].add(ref, None)
        js[name] = attention.js_of_means(reductions["pi"], reductions["rope"]).estimate
    change = js["bf16"] / js["fp32"] - 1
    print(f"JS of means, PI x4 vs RoPE at 1024, 3 samples: fp32 {js['fp32']:.3e}, bf16 {js['bf16']:.3e} nats "
          f"({100 * change:+.2f} %)")
    assert js["fp32"] > 1e-4 and abs(change) < 0.10


@pytest.mark.smollm2
def test_same_passkey_answers_and_decoding_entropy(smollm2):
    """needle.py's passkey cells (plain prompt, KV-cache greedy decoding with Algorithm 1's entropy): the same
    key found in every cell; where the two answers are the same text (after the key greedy decoding may part on
    a near tie), the entropy of the rows that produced it within 0.02 nats."""
    models, tokenizer = smollm2
    lengths, depths = [768, 1536], [25, 75]
    hay = passkey_haystack(tokenizer, lengths, MAX_NEW_TOKENS["passkey"], chat=False)
    cells = {name: {(L, d): passkey_cell(model, hay, L, d, passkeys(0, L, d, 1)) for L in lengths for d in depths}
             for name, model in models.items()}
    same_text = 0
    for key in cells["fp32"]:
        fp32, bf16 = cells["fp32"][key], cells["bf16"][key]
        print(f"passkey {key}: key {fp32['keys'][0]}, fp32 {fp32['answers'][0]!r} ({fp32['entropy']:.4f} nats), "
              f"bf16 {bf16['answers'][0]!r} ({bf16['entropy']:.4f} nats)")
        assert bf16["found"] == fp32["found"]
        if bf16["answers"] == fp32["answers"]:   # the same rows decoded: their entropy is comparable
            same_text += 1
            assert abs(bf16["entropy"] - fp32["entropy"]) < 0.02
    assert sum(c["passed"] for c in cells["fp32"].values()) >= 2    # the grid is one the model can answer
    assert same_text >= 2


MINI = ["--init", "random", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "4", "--ffn", "192",
        "--len", "128", "--batch-tokens", "1024", "--tokens", str(200 * 1024), "--lr", "3e-3", "--warmup", "20",
        "--schedule", "cosine", "--builtin", "prose", "--device", "cpu", "--quiet", "--save-every", "0",
        "--eval-tokens", "16384", "--eval-every", "200"]


@pytest.mark.smollm2
@pytest.mark.slow
def test_training_from_scratch_held_out_loss_within_1_percent(tmp_path):
    final = {}
    for name in DTYPES:
        out = train.main(MINI + ["--dtype", name, "--out", str(tmp_path / name)])
        held_out = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
        assert held_out[0]["eval_loss"] - held_out[-1]["eval_loss"] > 1.0      # it learned
        final[name] = held_out[-1]["eval_loss"]
    change = final["bf16"] / final["fp32"] - 1
    print(f"held-out loss after 200 steps: fp32 {final['fp32']:.4f}, bf16 {final['bf16']:.4f} "
          f"({100 * change:+.3f} %)")
    assert abs(change) < 0.01
