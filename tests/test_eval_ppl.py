"""eval_ppl.py and ropelite.ppl: chunked loss, closed forms (uniform logits -> PPL = V), the sliding windows by
hand, per-document averaging by hand, RoPE switching without a reload, resume, one-line errors.

Every expected value comes from an independent computation: full (T, V) logits from ``model(ids)`` and
``log_softmax``, never from ``Llama.nll`` or ropelite.ppl themselves.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_ppl  # noqa: E402
from ropelite.cli import run_script  # noqa: E402
from ropelite.errors import RopeliteError  # noqa: E402
from ropelite.hf import load_model, save_model
from ropelite.model import Llama
from ropelite.ppl import (choose_documents, effective_base, perplexity, perplexity_interval,  # noqa: E402
                          sliding_windows, window_sums)
from ropelite.rope import RopeConfig  # noqa: E402
from ropelite.stats import bootstrap_mean  # noqa: E402

V = 97
REPO = Path(__file__).resolve().parents[1]


def token_nll(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    """NLL of tokens 1..T-1 of ``ids`` (T,) from one full forward: (T-1,), float64."""
    with torch.no_grad():
        logp = model(ids[None])[0].double().log_softmax(-1)                        # (T, V)
    return -logp[:-1].gather(1, ids[1:, None]).squeeze(1)


def random_ids(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, V, n))


# ---------------------------------------------------------------------------------------------------------------
# The loss and the protocols
# ---------------------------------------------------------------------------------------------------------------

def test_chunked_loss_equals_unchunked(tiny_llama):
    model = tiny_llama()
    ids = random_ids(50, 0)
    expected = float(token_nll(model, ids).sum())
    for chunk in (1, 7, 49, 1000):
        with torch.no_grad():
            total, count = model.nll(ids[None], chunk_size=chunk)
        assert int(count) == 49
        assert float(total) == pytest.approx(expected, rel=1e-5)
    # and through the protocol: the document's mean NLL, whatever the chunking
    for chunk in (3, 512):
        assert perplexity(model, [ids.numpy()], 50, chunk_size=chunk)["nll"] == pytest.approx(expected / 49, rel=1e-5)


@pytest.mark.parametrize("protocol", ["truncate", "sliding"])
def test_uniform_logits_give_ppl_equal_to_vocab(tiny_llama, protocol):
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: p = 1/V for every token, NLL = ln V
    docs = [random_ids(40, s).numpy() for s in range(3)]
    result = perplexity(model, docs, 33, protocol, window=8, stride=3)
    assert result["ppl"] == pytest.approx(V, rel=1e-6)
    assert result["tokens"] == 3 * 32 and result["docs"] == 3


def test_sliding_windows_by_hand():
    # 10 tokens, W=4, S=2: windows end at 4, 6, 8, 10, each W long, scoring 1..3, 4..5, 6..7, 8..9
    assert sliding_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    # the last window is cut at the end but keeps W tokens of context
    assert sliding_windows(10, 4, 3) == [(0, 4, 1), (3, 7, 4), (6, 10, 7)]
    # side by side (S = W): a window cannot predict its own first token, so each starts on the last one's end
    assert sliding_windows(8, 4, 4) == [(0, 4, 1), (3, 7, 4), (4, 8, 7)]
    assert sliding_windows(3, 4, 2) == [(0, 3, 1)]  # shorter than a window: one window, as truncate
    with pytest.raises(RopeliteError, match="stride"):
        sliding_windows(10, 4, 5)


def test_sliding_nll_is_the_hand_sum_over_windows(tiny_llama):
    """Each token scored once, with exactly the context of the window that first reaches it (W=4, S=2)."""
    model = tiny_llama()
    ids = random_ids(10, 1)
    # by hand: (window tokens, positions in the window whose NLL counts)
    expected = (token_nll(model, ids[0:4])[0:3].sum()     # predicts tokens 1, 2, 3
                + token_nll(model, ids[2:6])[1:3].sum()   # tokens 4, 5 with context 2..
                + token_nll(model, ids[4:8])[1:3].sum()   # tokens 6, 7
                + token_nll(model, ids[6:10])[1:3].sum())  # tokens 8, 9
    windows = window_sums(model, ids, window=4, stride=2, chunk_size=1)
    assert [n for _, n in windows] == [3, 2, 2, 2]
    total, count = sum(s for s, _ in windows), sum(n for _, n in windows)
    assert count == 9
    assert windows[1][0] == pytest.approx(float(token_nll(model, ids[2:6])[1:3].sum()), rel=1e-5)
    assert total == pytest.approx(float(expected), rel=1e-5)
    # and it differs from the full-context NLL, so the windows really cut the context
    assert total != pytest.approx(float(token_nll(model, ids).sum()), rel=1e-3)


@pytest.mark.parametrize("n,window,stride", [(37, 8, 3), (37, 8, 8), (37, 36, 1), (64, 16, 16), (5, 8, 2)])
def test_sliding_scores_every_token_exactly_once(tiny_llama, n, window, stride):
    model = tiny_llama()
    ids = random_ids(n, 2)
    assert sum(count for _, count in window_sums(model, ids, window, stride)) == n - 1
    scored = [p for _, end, first in sliding_windows(n, window, stride) for p in range(first, end)]
    assert scored == list(range(1, n))  # each position once, in order


def test_sliding_with_one_window_equals_truncate(tiny_llama):
    model = tiny_llama()
    docs = [random_ids(24, s).numpy() for s in (3, 4, 5)]
    truncate = perplexity(model, docs, 24, "truncate")
    scalars = lambda r: {k: v for k, v in r.items() if not isinstance(v, list)}  # noqa: E731
    for window in (24, 100):
        sliding = perplexity(model, docs, 24, "sliding", window=window, stride=window)
        assert scalars(sliding) == pytest.approx(scalars(truncate))   # the interval too: one unit per document
        assert sliding["doc_nll"] == pytest.approx(truncate["doc_nll"]) and sliding["ppl_unit"] == "documents"
    hand = np.mean([float(token_nll(model, torch.from_numpy(d)).mean()) for d in docs])
    assert truncate["nll"] == pytest.approx(hand, rel=1e-5)


def steered(model: Llama, n: int, pick) -> torch.Tensor:
    """n tokens, each the model's most (pick=argmax) or least (argmin) likely next token: low / high NLL."""
    ids = torch.tensor([3])
    with torch.no_grad():
        while len(ids) < n:
            ids = torch.cat([ids, pick(model(ids[None])[0, -1]).view(1)])
    return ids


def test_truncate_averages_each_document_then_exponentiates(tiny_llama):
    model = tiny_llama()
    likely, unlikely = steered(model, 30, torch.argmax), steered(model, 30, torch.argmin)
    a, b = (float(token_nll(model, d[:20]).mean()) for d in (likely, unlikely))
    assert b - a > 1.0
    result = perplexity(model, [likely.numpy(), unlikely.numpy()], 20)
    assert result["nll"] == pytest.approx((a + b) / 2, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp((a + b) / 2), rel=1e-5)
    assert result["ppl"] != pytest.approx((math.exp(a) + math.exp(b)) / 2, rel=1e-2)  # not a mean of PPLs
    assert result["tokens"] == 2 * 19


def test_the_interval_is_a_bootstrap_over_documents_and_the_nlls_reproduce_the_ppl(tiny_llama):
    model = tiny_llama()
    docs = [random_ids(30, s).numpy() for s in range(5)]
    result = perplexity(model, docs, 30)
    hand = [float(token_nll(model, torch.from_numpy(d)).mean()) for d in docs]   # each document's mean NLL
    assert result["doc_nll"] == pytest.approx(hand, rel=1e-5)
    assert math.exp(np.mean(result["doc_nll"])) == pytest.approx(result["ppl"], rel=1e-12)
    expected = bootstrap_mean(hand, transform=math.exp)                          # the documents are the units
    assert (result["ppl_low"], result["ppl_high"]) == pytest.approx((expected.low, expected.high), rel=1e-5)
    assert result["ppl_low"] < result["ppl"] < result["ppl_high"] and result["ppl_n"] == 5
    assert (result["ppl_unit"], result["window_tokens"]) == ("documents", [29])
    two = perplexity(model, docs[:2], 30)                                        # two units: no interval
    assert (two["ppl_low"], two["ppl_high"], two["ppl_n"]) == (None, None, 2)


def test_the_sliding_interval_resamples_windows_by_their_influence_on_the_ratio(tiny_llama):
    """Sliding: the units are the windows; window i, whose n_i scored tokens have NLL sum s_i, is
    R + K (s_i - R n_i) / N (R = sum s / sum n, K windows and N tokens in all), so their plain mean is R, the mean
    document NLL, and a window of average NLL counts as R whatever its size."""
    model = tiny_llama()
    docs = [random_ids(10, s).numpy() for s in (11, 12)]
    result = perplexity(model, docs, 10, "sliding", window=4, stride=2)   # windows score 3, 2, 2, 2 tokens
    sums, counts = [], []
    for d in docs:
        ids = torch.from_numpy(d)
        sums += [float(token_nll(model, ids[0:4])[0:3].sum()), float(token_nll(model, ids[2:6])[1:3].sum()),
                 float(token_nll(model, ids[4:8])[1:3].sum()), float(token_nll(model, ids[6:10])[1:3].sum())]
        counts += [3, 2, 2, 2]
    ratio = sum(sums) / sum(counts)
    units = [ratio + 8 * (s - ratio * n) / 18 for s, n in zip(sums, counts)]
    assert np.mean(units) == pytest.approx(ratio) and ratio == pytest.approx(result["nll"], rel=1e-5)
    expected = bootstrap_mean(units, transform=math.exp)
    assert result["ppl_n"] == 8 and result["ppl_unit"] == "windows" and result["window_tokens"] == [3, 2, 2, 2]
    assert (result["ppl_low"], result["ppl_high"]) == pytest.approx((expected.low, expected.high), rel=1e-5)
    assert result["ppl_low"] < result["ppl"] < result["ppl_high"]
    # each document's windows give back its mean NLL
    for means, nll in zip(result["window_nll"], result["doc_nll"]):
        assert np.dot(means, [3, 2, 2, 2]) / 9 == pytest.approx(nll, rel=1e-12)
    assert perplexity_interval(result["window_nll"], [3, 2, 2, 2]).low == result["ppl_low"]
    # windows of equal NLL per token, of any size, leave nothing to resample: the interval is the point
    flat = perplexity_interval([[2.0, 2.0, 2.0, 2.0]] * 2, [3, 2, 2, 2])
    assert flat.low == pytest.approx(math.exp(2.0)) and flat.high == pytest.approx(math.exp(2.0))


def test_perplexity_refuses_short_documents(tiny_llama):
    with pytest.raises(RopeliteError, match="1 of 2 documents have fewer than 20 tokens"):
        perplexity(tiny_llama(), [np.arange(20), np.arange(10)], 20)


def test_choose_documents():
    lengths = [5, 20, 12, 20, 3]
    assert choose_documents(lengths, 10) == [1, 2, 3]
    assert choose_documents(lengths, 10, max_docs=2) == [1, 3]          # the two longest, corpus order on ties
    assert choose_documents(lengths, 15, max_docs=3) == [1, 3]          # of the 3 longest, those reaching 15
    assert choose_documents(lengths, 4, max_docs=3) == [1, 2, 3]        # nested: same documents at every length
    assert choose_documents(lengths, 21) == []


def test_effective_base():
    d, theta, L = 64, 1e5, 8192
    assert effective_base(RopeConfig("ntk", theta, 4.0, L, base=1e6), d, 100) == pytest.approx(1e6)
    assert effective_base(RopeConfig("ntk", theta, 4.0, L), d, 100) == pytest.approx(theta * 4 ** (64 / 62))
    dyn = RopeConfig("dynamic", theta, 4.0, L)
    assert effective_base(dyn, d, L) == pytest.approx(theta)
    assert effective_base(dyn, d, 2 * L) == pytest.approx(theta * (4 * 2 - 3) ** (64 / 62))
    assert effective_base(RopeConfig("yarn", theta, 4.0, L), d, 2 * L) == theta
    assert effective_base(RopeConfig("rope", theta), d, 2 * L) == theta


def test_passing_a_rope_equals_loading_with_that_rope(tiny_llama, tmp_path):
    """eval_ppl runs each variant by passing its RoPE to one loaded model: the same numbers as a fresh load,
    and the model itself is left as it was."""
    save_model(tiny_llama(), tmp_path / "m")
    model = load_model(tmp_path / "m")
    pretrained = model.config
    ids = random_ids(150, 6)[None]  # past the pretrained 64, where the variants differ
    for rope, kw in [("yarn", {}), ("dynamic", {}), ("ntk", {"base": 1e6}), ("pi", {})]:
        fresh = load_model(tmp_path / "m", rope, 4.0, **kw)
        variant = model.config.with_rope(rope, 4.0, **kw).rope
        with torch.no_grad():
            assert torch.equal(model(ids, rope=variant), fresh(ids))
            assert torch.equal(model.nll(ids, rope=variant)[0], fresh.nll(ids)[0])
    assert model.config is pretrained


# ---------------------------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def setup(tiny_llama, tmp_path):
    """A saved tiny model (no tokenizer) and a folder of four token documents of 80, 80, 80 and 40 tokens."""
    save_model(tiny_llama(), tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    for i, n in enumerate([80, 80, 80, 40]):
        np.save(data / f"doc{i}.npy", np.random.default_rng(i).integers(0, V, n))
    return tmp_path / "model", data, tmp_path / "out"


def argv(setup, *extra):
    model, data, out = setup
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu", *extra]


def test_script_rows_match_the_library(setup):
    model_dir, data, out = setup
    eval_ppl.main(argv(setup, "--rope", "rope", "yarn", "ntk", "dynamic", "--factor", "2", "--base", "5e4",
                       "--lengths", "16", "80", "--docs", "2", "--dtype", "fp32"))   # fp32: the library's exact rows
    rows = json.loads((out / "ppl.json").read_text())
    assert [(r["rope"], r["length"]) for r in rows] == [(rope, n) for rope in ("rope", "yarn", "ntk", "dynamic")
                                                        for n in (16, 80)]
    docs = [np.load(data / f"doc{i}.npy") for i in (0, 1)]  # the two longest, corpus order
    for r in rows:
        assert r["protocol"] == "truncate" and r["docs"] == 2 and r["tokens"] == 2 * (r["length"] - 1)
        kw = {"base": 5e4} if r["rope"] == "ntk" else {}
        fresh = load_model(model_dir, r["rope"], 2.0 if r["rope"] != "rope" else None, **kw)
        assert r["ppl"] == pytest.approx(perplexity(fresh, docs, r["length"])["ppl"], rel=1e-6)
    # dynamic is plain RoPE within the pretrained 64 tokens: that row is copied, not recomputed
    assert rows[6]["same_as"] == "rope" and rows[6]["ppl"] == rows[0]["ppl"]
    assert rows[7]["same_as"] is None and rows[7]["ppl"] != rows[1]["ppl"]
    assert rows[4]["base"] == pytest.approx(5e4) and rows[2]["base"] == 1e4 and rows[2]["factor"] == 2.0
    assert rows[7]["base"] == pytest.approx(1e4 * (2 * 80 / 64 - 1) ** (16 / 14))
    assert {"model", "rope", "factor", "base", "length", "protocol", "docs", "tokens", "nll", "ppl",
            "seconds"} <= set(rows[0])
    assert (out / "ppl.csv").read_text().count("\n") == 9
    assert (out / "ppl.png").read_bytes()[:4] == b"\x89PNG"


def ppl_row(sid, n, ppl, low, high, docs=3):
    """A results row with a hand-set interval; its documents' NLLs spread around ln ppl by -0.1, 0, +0.1."""
    offsets = [-0.1, 0.0, 0.1][:docs] if docs > 1 else [0.0]
    return {"settings": sid, "rope": {"a": "rope", "b": "yarn", "c": "ntk"}[sid], "length": n, "ppl": ppl,
            "ppl_low": low, "ppl_high": high, "ppl_n": docs, "ppl_unit": "documents", "nll": math.log(ppl),
            "docs": docs, "doc_ids": list(range(docs)), "doc_nll": [math.log(ppl) + o for o in offsets]}


def test_findings_give_every_length_with_its_interval_and_the_lowest_past_training():
    labels = {"a": "rope", "b": "yarn x4", "c": "ntk x4"}
    cells = {("a", 64): (10.0, 9.0, 11.0), ("b", 64): (10.5, 9.5, 11.5), ("c", 64): (10.2, 9.2, 11.2),
             ("a", 128): (40.0, 35.0, 45.0), ("b", 128): (12.0, 11.0, 13.0), ("c", 128): (13.0, 12.5, 14.0),
             ("a", 256): (90.0, 80.0, 100.0), ("b", 256): (30.0, 28.0, 32.0), ("c", 256): (15.0, 14.0, 16.0)}
    rows = [ppl_row(sid, n, *v) for (sid, n), v in cells.items()]  # the lowest flips from yarn to ntk at 256
    lines, numbers = eval_ppl.findings(rows + [{**rows[0], "settings": "other"}], labels, [64, 128, 256], 64)
    assert lines == [
        "64 tokens, 3 documents: rope 10.00 [9.00, 11.00] (n=3), yarn x4 10.50 [9.50, 11.50] (n=3), "
        "ntk x4 10.20 [9.20, 11.20] (n=3).",
        "128 tokens (past the training length), 3 documents: rope 40.00 [35.00, 45.00] (n=3), "
        "yarn x4 12.00 [11.00, 13.00] (n=3), ntk x4 13.00 [12.50, 14.00] (n=3).",
        "256 tokens (past the training length), 3 documents: rope 90.00 [80.00, 100.00] (n=3), "
        "yarn x4 30.00 [28.00, 32.00] (n=3), ntk x4 15.00 [14.00, 16.00] (n=3).",
        # every document grew by the same factor: the paired interval is that factor alone
        "Perplexity at 256 over that at 64, the longest length within the training length 64, with its interval "
        "over the documents (paired): rope x9.00 [9.00, 9.00] (n=3), yarn x4 x2.86 [2.86, 2.86] (n=3), "
        "ntk x4 x1.47 [1.47, 1.47] (n=3).",
        "Lowest past the training length 64: 128: yarn x4 (its interval overlaps ntk x4: the data cannot tell them "
        "apart), 256: ntk x4 (its interval below every other's)."]
    assert numbers["train_len"] == 64 and len(numbers["rows"]) == 9   # the other settings' row is not this run's
    assert numbers["rows"][0] == {"rope": "rope", "length": 64, "ppl": 10.0, "ppl_low": 9.0, "ppl_high": 11.0,
                                  "ppl_n": 3, "ppl_unit": "documents", "nll": math.log(10.0), "docs": 3}
    # for paper.py: plain RoPE against every other variant past the training length, claimed to be the higher
    comparisons = numbers["comparisons"]
    assert [(c["a"]["label"], c["b"]["label"], c["expected"]) for c in comparisons] == [
        ("rope", "yarn x4", "higher"), ("rope", "ntk x4", "higher")] * 2
    assert comparisons[0]["claim"].startswith("At 128 tokens") and comparisons[0]["b"]["low"] == 11.0
    lines, numbers = eval_ppl.findings(rows, labels, [64], 64)
    assert lines[-1] == "No length past the training length 64: nothing here is extrapolated."
    assert numbers["comparisons"] == []
    # two documents: no interval, the line says n
    two = [ppl_row("a", 64, 10.0, None, None, docs=2), ppl_row("b", 64, 11.0, None, None, docs=2)]
    assert eval_ppl.findings(two, labels, [64], 64)[0][0] == ("64 tokens, 2 documents: rope 10.00 (n=2), "
                                                            "yarn x4 11.00 (n=2).")


def test_growth_is_paired_over_the_same_documents_only():
    lo, hi = ppl_row("a", 64, 10.0, 9.0, 11.0), ppl_row("a", 128, 10.0 * math.exp(0.7), 18.0, 22.0)
    hi["doc_nll"] = [math.log(10.0) + d for d in (0.5, 0.7, 0.9)]  # each document grew by its own factor:
    i = eval_ppl.growth(lo, hi)                                    # e^0.6, e^0.7, e^0.8
    assert i.estimate == pytest.approx(hi["ppl"] / lo["ppl"]) and i.n == 3 and i.low < i.estimate < i.high
    assert math.exp(0.6) - 1e-12 <= i.low and i.high <= math.exp(0.8) + 1e-12   # within the documents' own
    other = eval_ppl.growth(lo, {**hi, "doc_ids": [0, 1, 3]})                    # other documents: no pairs
    assert other.estimate == pytest.approx(math.exp(0.7)) and not other.known and other.n == 3


def test_the_script_writes_its_summary_and_a_rerun_rewrites_it_unchanged(setup):
    out = setup[2]
    args = argv(setup, "--rope", "rope", "pi", "--factor", "2", "--lengths", "32", "80", "--docs", "2")
    eval_ppl.main(args)
    written = (out / "ppl_summary.json").read_text()
    summary, rows = json.loads(written), json.loads((out / "ppl.json").read_text())
    assert summary["results"] == "ppl" and "Zhong" in summary["claim"]
    labels = {r["settings"]: r["label"] for r in rows}
    assert summary["finding"] == eval_ppl.findings(rows, labels, [32, 80], 64)[0]
    assert summary["finding"][1] == (f"80 tokens (past the training length), 2 documents: "
                                     f"rope {rows[1]['ppl']:.2f} (n=2), pi x2 {rows[3]['ppl']:.2f} (n=2).")
    assert [c["b"]["label"] for c in summary["numbers"]["comparisons"]] == ["pi x2"]
    eval_ppl.main(args)  # nothing to run: the same summary, byte for byte (paper.py's fingerprint stays)
    assert (out / "ppl_summary.json").read_text() == written


def test_script_sliding_rows_say_so(setup):
    eval_ppl.main(argv(setup, "--protocol", "sliding", "--window", "16", "--stride", "8", "--lengths", "64"))
    (row,) = json.loads((setup[2] / "ppl.json").read_text())
    assert (row["protocol"], row["window"], row["stride"], row["tokens"], row["docs"]) == ("sliding", 16, 8,
                                                                                          3 * 63, 3)
    # 63 scored tokens per document: the first window scores 15, then six of 8: 7 windows x 3 documents
    assert row["window_tokens"] == [15] + [8] * 6 and (row["ppl_unit"], row["ppl_n"]) == ("windows", 21)
    assert row["ppl_low"] <= row["ppl"] <= row["ppl_high"]
    assert math.exp(np.mean(row["doc_nll"])) == pytest.approx(row["ppl"], rel=1e-12)


def test_script_rows_carry_their_interval_from_three_documents_on(setup, capsys):
    """Every row holds ppl_low <= ppl <= ppl_high with n >= 3 units, null ends below; the per-document NLLs give
    back the PPL; the printed table shows the interval or, without one, n."""
    eval_ppl.main(argv(setup, "--rope", "rope", "pi", "--factor", "2", "--lengths", "16", "64"))
    eval_ppl.main(argv(setup, "--rope", "rope", "--lengths", "16", "--docs", "2", "--out", str(setup[2] / "two")))
    printed = capsys.readouterr().out
    rows = json.loads((setup[2] / "ppl.json").read_text())
    assert [r["ppl_n"] for r in rows] == [4, 3, 4, 3]     # 4 documents reach 16 tokens, 3 reach 64
    for r in rows:
        assert r["ppl_low"] <= r["ppl"] <= r["ppl_high"] and r["ppl_low"] < r["ppl_high"]
        assert len(r["doc_nll"]) == r["docs"] and math.exp(np.mean(r["doc_nll"])) == pytest.approx(r["ppl"])
        assert r["window_nll"] is None and r["ppl_unit"] == "documents"
    (two,) = json.loads((setup[2] / "two" / "ppl.json").read_text())
    assert (two["ppl_low"], two["ppl_high"], two["ppl_n"]) == (None, None, 2)
    csv = (setup[2] / "ppl.csv").read_text().splitlines()
    assert {"ppl_low", "ppl_high", "ppl_n", "doc_nll"} <= set(csv[0].split(","))
    table = printed.split("results in")[1].splitlines()[1:5]
    r = rows[0]
    assert table[1].split() == ["n=4", "documents", "n=3", "documents"]
    assert table[2].startswith("rope") and f"{r['ppl']:.3f} [{r['ppl_low']:.3f}, {r['ppl_high']:.3f}]" in table[2]
    assert printed.rstrip().splitlines()[-1].split()[-1] == f"{two['ppl']:.3f}"   # no interval: the number alone
    assert "n=2 documents" in printed.rstrip().splitlines()[-2]


def test_rows_without_an_interval_are_measured_again(setup, capsys):
    args = argv(setup, "--lengths", "16")
    eval_ppl.main(args)
    (row,) = json.loads((setup[2] / "ppl.json").read_text())
    old = {k: v for k, v in row.items() if not k.startswith("ppl_") and k not in ("doc_nll", "window_nll")}
    (setup[2] / "ppl.json").write_text(json.dumps([old]))       # as an older ropelite wrote it
    eval_ppl.main(args)
    err = capsys.readouterr().err
    assert "1 row in" in err and "have no interval (an older ropelite): measuring again" in err
    (again,) = json.loads((setup[2] / "ppl.json").read_text())
    assert again["ppl_n"] == 4 and again["ppl"] == row["ppl"]


def test_left_out_window_and_stride_are_printed(setup, capsys):
    eval_ppl.main(argv(setup, "--protocol", "sliding", "--lengths", "80"))
    err = capsys.readouterr().err
    assert "sliding protocol: window 64 (default: the training length), stride 32 (default: W/2)" in err
    (row,) = json.loads((setup[2] / "ppl.json").read_text())
    assert (row["window"], row["stride"]) == (64, 32)
    eval_ppl.main(argv(setup, "--protocol", "sliding", "--window", "16", "--stride", "4", "--lengths", "32",
                       "--out", str(setup[2] / "given")))
    assert "sliding protocol: window 16, stride 4\n" in capsys.readouterr().err


def test_resume_skips_finished_rows(setup, monkeypatch):
    out = setup[2]
    args = argv(setup, "--rope", "rope", "pi", "--factor", "2", "--lengths", "16", "32")
    eval_ppl.main(args)
    first = json.loads((out / "ppl.json").read_text())
    assert len(first) == 4

    calls = []
    real = eval_ppl.perplexity
    monkeypatch.setattr(eval_ppl, "perplexity", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    eval_ppl.main(args)  # everything done: nothing runs, nothing changes
    assert calls == [] and json.loads((out / "ppl.json").read_text()) == first

    (out / "ppl.json").write_text(json.dumps(first[:3]))  # as if killed before the last row
    eval_ppl.main(args)
    assert calls == [32]
    rows = json.loads((out / "ppl.json").read_text())
    assert [(r["rope"], r["length"]) for r in rows] == [(r["rope"], r["length"]) for r in first]

    eval_ppl.main(argv(setup, "--rope", "pi", "--factor", "4", "--lengths", "16"))  # other settings: new row
    assert calls == [32, 16] and len(json.loads((out / "ppl.json").read_text())) == 5


def test_some_documents_too_short_warns_with_the_count(setup, capsys):
    eval_ppl.main(argv(setup, "--lengths", "40", "64"))
    err = capsys.readouterr().err
    assert "only 3 of 4 documents have 64 tokens; length 64 uses 3 instead of 4" in err
    rows = json.loads((setup[2] / "ppl.json").read_text())
    assert [r["docs"] for r in rows] == [4, 3]


@pytest.mark.parametrize("extra,message", [
    (["--lengths", "16", "1000"], "error: no document has 1000 tokens (longest: 80); 0 of 4 qualify"),
    (["--protocol", "sliding", "--window", "8", "--stride", "9"], "error: the stride (9) must be between 1 and the window (8"),
    (["--protocol", "sliding", "--window", "8", "--stride", "0"], "error: the stride (0) must be between 1 and the window (8"),
    (["--protocol", "sliding", "--stride", "0"], "error: the stride (0) must be between 1 and the window (64"),
    (["--protocol", "sliding", "--window", "0"], "error: the stride (1) must be between 1 and the window (0"),
    (["--window", "8"], "error: --window and --stride belong to --protocol sliding"),
    (["--base", "1e6"], "error: a new base is an NTK setting; rope 'rope' does not take one"),
    (["--lengths", "1"], "error: --lengths must be at least 2"),
    (["--rope", "pi", "--lengths", "16"], "error: --rope pi needs --factor: the checkpoint runs rope"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"],
     "error: --device cuda: " if not torch.cuda.is_available() else "error: --device 'nonsense' is not a torch"),
    (["--rope", "longrope", "--lengths", "16"], "error: rope 'longrope' needs short_factor and long_factor lists"),
])
def test_bad_input_is_one_line(setup, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        run_script(lambda: eval_ppl.main(argv(setup, *extra)))
    assert e.value.code == 2
    *notes, err = capsys.readouterr().err.strip().splitlines()
    # the error comes last; before it at most one line, --dtype auto's
    assert err.startswith(message) and len(notes) <= 2 and all(n.startswith(("dtype: ", "rope: --factor not given")) for n in notes)


def test_no_documents_and_unknown_variant(setup, tmp_path, capsys):
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros(0, dtype=np.int64))
    with pytest.raises(SystemExit) as e:
        run_script(lambda: eval_ppl.main(["--model", str(setup[0]), "--data", str(empty), "--out", str(setup[2])]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no non-empty documents") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        run_script(lambda: eval_ppl.main(argv(setup, "--rope", "rope", "bogus")))
    err = capsys.readouterr().err.strip()  # one line, not argparse's usage block
    assert e.value.code == 2 and "invalid choice: 'bogus'" in err and "\n" not in err


def test_script_run_as_a_program_fails_in_one_line(setup):
    proc = subprocess.run([sys.executable, str(REPO / "eval_ppl.py"), *argv(setup, "--lengths", "500")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    *notes, err = proc.stderr.strip().splitlines()
    assert err == ("error: no document has 500 tokens (longest: 80); 0 of 4 qualify: give "
                   f"shorter --lengths or longer --data ({eval_ppl.ONE_PER_DOCUMENT})")
    # the error comes last; before it at most one line, --dtype auto's
    assert len(notes) <= 2 and all(n.startswith(("dtype: ", "rope: --factor not given")) for n in notes)
    assert "analyze.py --samples" in eval_ppl.ONE_PER_DOCUMENT  # names the option that gives more sequences


def test_out_holding_something_else_is_refused(setup, capsys):
    setup[2].mkdir()
    (setup[2] / "ppl.json").write_text('{"not": "rows"}')
    with pytest.raises(SystemExit) as e:
        run_script(lambda: eval_ppl.main(argv(setup, "--lengths", "16")))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith("ppl.json is not a ppl results file; use another --out")


def test_figure_leaves_out_what_a_log_axis_cannot_show(tmp_path, capsys):
    rows = [{"settings": "a", "length": 16, "ppl": float("inf")}, {"settings": "a", "length": 32, "ppl": 0.0}]
    eval_ppl.draw(rows, {"a": "rope"}, 16, tmp_path / "ppl.png", "t")
    assert not (tmp_path / "ppl.png").exists()
    assert "no perplexity to draw; ppl.png not written" in capsys.readouterr().err
    rows.append({"settings": "a", "length": 64, "ppl": 12.5})
    eval_ppl.draw(rows, {"a": "rope"}, 16, tmp_path / "ppl.png", "t")
    assert (tmp_path / "ppl.png").is_file()
    assert "2 perplexities are not finite and positive" in capsys.readouterr().err


def test_rows_name_their_documents_and_lines_stay_apart(setup, monkeypatch):
    figures = []
    monkeypatch.setattr(eval_ppl, "save_figure", lambda fig, path, **kw: figures.append(fig))
    eval_ppl.main(argv(setup, "--rope", "rope", "dynamic", "--factor", "2", "--lengths", "16", "32"))
    rows = json.loads((setup[2] / "ppl.json").read_text())
    data = str(setup[1])
    assert all(r["documents"] == [f"{data}#{i}" for i in r["doc_ids"]] for r in rows)
    ax = figures[-1].axes[0]
    curves = [line for line in ax.lines if line.get_label() in ("rope", "dynamic x2")]
    assert [list(c.get_ydata()) for c in curves][0] == [list(c.get_ydata()) for c in curves][1]  # same values...
    assert curves[0].get_marker() != curves[1].get_marker()                  # ...told apart by their markers
    assert curves[0].get_markersize() > curves[1].get_markersize()           # the one below shows around the top
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_xdata()) == [64, 64]      # the tiny model's pretrained L
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert any(label for label in labels)                                    # the y axis is labelled
    assert ax.get_title().endswith(f"\n4 documents: {data}#0, {data}#1, {data}#2, {data}#3")  # named
    assert ax.get_legend().get_texts()[-1].get_text() == "95 % interval (bootstrap)"      # the shaded bands
    assert len(ax.collections) == 2                                                       # one per variant
    assert eval_ppl.named_documents(["lcet10"]) == "lcet10"
    assert eval_ppl.named_documents(list("abcdefg")) == "7 documents: a, b, c, d, e and 2 more"


def test_y_labels_reach_the_values_under_a_far_line():
    # the mini report's case: PI x4 at ~270 beside the others at 23-30 must still leave labels at 20 and 30
    steps = eval_ppl.y_label_steps([23.4, 30.3, 272.9])
    assert {2.0, 3.0} <= set(steps)
    assert eval_ppl.y_label_steps([20, 2000]) == (1.0, 2.0, 5.0)
    assert eval_ppl.y_label_steps([2, 2e5]) == (1.0,)


def test_trained_length_is_a_finetunes_own_len(tiny_llama, tmp_path):
    from ropelite.hf import config_to_hf, trained_length
    model = tiny_llama()
    save_model(model, tmp_path / "pre")
    assert trained_length(tmp_path / "pre") == 64
    record = {**config_to_hf(model.config)["ropelite"], "trained": {"len": 256}}  # as train.py records it
    save_model(model, tmp_path / "ft", extra_config={"ropelite": record})
    assert trained_length(tmp_path / "ft") == 256


def test_a_second_run_on_a_locked_out_fails_in_one_line(setup):
    out = setup[2]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ropelite.io import lock_out; "
                               f"lock_out({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run([sys.executable, str(REPO / "eval_ppl.py"), *argv(setup, "--lengths", "16")],
                              capture_output=True, text=True, cwd=REPO)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: --out {out} is in use by another run (pid {holder.pid}); wait for it "
                                   "to end or choose another --out")
    assert not (out / "ppl.json").exists()
