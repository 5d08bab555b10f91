"""ropelite.attention: the last query's rows against a full eager forward of a model built with that RoPE; the
running sums and their summary against numpy on random distributions; the resume state; the entropy meter of
Algorithm 1 against closed forms and an independent full forward.
"""

import math

import numpy as np
import pytest
import torch

from ropelite import attention
from ropelite.errors import RopeliteError
from ropelite.rope import RopeConfig
from ropelite.stats import bootstrap_mean

VOCAB = 259


# ---------------------------------------------------------------------------------------------------------------
# The last query's attention of a variant
# ---------------------------------------------------------------------------------------------------------------

def test_last_rows_run_the_variants_rope(tiny_llama):
    """One loaded model serves every variant: its rows equal the last rows of a full eager forward of a model
    built with that RoPE (same weights). L = 40 > the pretrained 16, so dynamic differs from rope too."""
    shared = tiny_llama(rope=RopeConfig(theta=1e4, original_max_position_embeddings=16))
    ids = np.random.default_rng(0).integers(0, 97, 40)
    previous = None
    for rope in ("pi", "yarn", "dynamic", "rope"):
        config = shared.config.with_rope(rope, factor=4)
        rows = attention.last_rows(attention.Variant(rope, shared, config, 0), ids)
        full = {}
        with torch.no_grad():
            tiny_llama(rope=config.rope)(torch.as_tensor(ids).view(1, -1), eager=True,
                                         on_attention=lambda layer, pos, probs: full.setdefault(layer, probs))
        expected = torch.stack([full[i][0, :, -1] for i in sorted(full)])       # (layers, heads, L)
        assert rows.shape == (2, 4, 40)
        torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-7)
        assert previous is None or (rows - previous).abs().max() > 1e-4        # the variants really differ
        previous = rows


# ---------------------------------------------------------------------------------------------------------------
# Running sums and Table 1 numbers
# ---------------------------------------------------------------------------------------------------------------

def random_distributions(seed: int, shape) -> np.ndarray:
    p = np.random.default_rng(seed).random(shape) ** 4
    p[..., :3] = 0                                       # exact zeros, as masked or underflowed attention has
    return p / p.sum(-1, keepdims=True)


def plogp(p: np.ndarray) -> np.ndarray:
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)


def js_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """JS(a, b) = H(m) - (H(a) + H(b)) / 2, m = (a + b) / 2: the entropy form, not the KL form of ropelite.stats."""
    return -plogp((a + b) / 2).sum(-1) + (plogp(a).sum(-1) + plogp(b).sum(-1)) / 2


def reductions(p: np.ndarray, q: np.ndarray) -> tuple:
    """(variant's, reference's) Reduction over the samples of p and q, (samples, layers, heads, L) each."""
    mine, ref = attention.Reduction(*p.shape[1:]), attention.Reduction(*q.shape[1:])
    for s in range(len(p)):
        mine.add(torch.from_numpy(p[s]), torch.from_numpy(q[s]))
        ref.add(torch.from_numpy(q[s]), None)
    return mine, ref


def test_reduction_summary_against_numpy():
    S, layers, heads, L = 3, 2, 4, 12
    p, q = random_distributions(0, (S, layers, heads, L)), random_distributions(1, (S, layers, heads, L))
    mine, ref = reductions(p.astype(np.float32), q.astype(np.float32))   # float32, as last_rows gives them
    r = attention.summarize(mine, ref)
    pbar, qbar = p.mean((0, 1, 2)), q.mean((0, 1, 2))
    assert r["js_mean_nats"] == pytest.approx(js_np(pbar, qbar), rel=1e-5)
    assert r["js_mean_bits"] == pytest.approx(js_np(pbar, qbar) / math.log(2), rel=1e-5)
    assert r["js_per_distribution_nats"] == pytest.approx(js_np(p, q).mean(), rel=1e-5)
    assert r["entropy_per_layer"] == pytest.approx((-plogp(p).sum(-1)).mean((0, 2)).tolist(), rel=1e-5)
    assert r["entropy"] == pytest.approx(-plogp(p).sum(-1).mean(), rel=1e-5)
    assert r["entropy_of_mean"] == pytest.approx(-plogp(pbar).sum(), rel=1e-5)
    assert r["uniform_entropy"] == pytest.approx(math.log(L))
    np.testing.assert_allclose(mine.per_head().numpy(), p.mean(0), rtol=1e-6)
    itself = attention.summarize(ref, ref)
    assert itself["js_mean_nats"] == 0 and itself["js_per_distribution_nats"] == 0
    assert set(r) <= set(attention.DEFINITIONS)


def bootstrap_js_by_hand(p, q, resamples, seed):
    """Bias-corrected percentile-bootstrap ends of JS(mean p, mean q) over samples, resampled in pairs, written
    with numpy: the percentiles less the resamples' mean excess over the estimate."""
    rng = np.random.default_rng(seed)
    n = len(p)
    values = [js_np(p[i].mean(0), q[i].mean(0)) for i in rng.integers(0, n, (resamples, n))]
    return np.percentile(values, [2.5, 97.5]) - (np.mean(values) - js_np(p.mean(0), q.mean(0)))


def test_js_of_means_interval():
    S, layers, heads, L = 8, 2, 3, 10
    p, q = random_distributions(2, (S, layers, heads, L)), random_distributions(3, (S, layers, heads, L))
    mine, ref = reductions(p, q)
    got = attention.js_of_means(mine, ref)
    per_sample_p, per_sample_q = p.mean((1, 2)), q.mean((1, 2))                 # (S, L)
    assert got.n == S and got.estimate == pytest.approx(attention.summarize(mine, ref)["js_mean_nats"], rel=1e-12)
    low, high = bootstrap_js_by_hand(per_sample_p, per_sample_q, 20_000, seed=7)   # another seed, another code
    # two random populations with the same law: their means barely differ, the interval reaches down to 0
    assert low < 0 and got.low == 0 and got.high == pytest.approx(high, rel=0.05)
    assert attention.js_of_means(mine, ref, seed=0) == got                      # seeded: the same interval
    # q tilted towards late keys: the means differ clearly and the interval is the hand one at both ends
    tilt = q * np.exp(np.linspace(0, 2, L))
    tilt /= tilt.sum(-1, keepdims=True)
    mine, ref = reductions(p, tilt)
    got = attention.js_of_means(mine, ref)
    low, high = bootstrap_js_by_hand(per_sample_p, tilt.mean((1, 2)), 20_000, seed=7)
    assert 0 < low and got.low == pytest.approx(low, rel=0.05) and got.high == pytest.approx(high, rel=0.05)
    assert got.low < got.estimate < got.high
    # the same sample n times has nothing to resample: the interval is the point; two samples give none
    same, same_ref = attention.Reduction(layers, heads, L), attention.Reduction(layers, heads, L)
    for _ in range(4):
        same.add(torch.from_numpy(p[0]), None)
        same_ref.add(torch.from_numpy(q[0]), None)
    one = attention.js_of_means(same, same_ref)
    assert one.low == pytest.approx(one.estimate, rel=1e-9) and one.high == pytest.approx(one.estimate, rel=1e-9)
    few, few_ref = attention.Reduction(layers, heads, L), attention.Reduction(layers, heads, L)
    for s in range(2):
        few.add(torch.from_numpy(p[s]), None)
        few_ref.add(torch.from_numpy(q[s]), None)
    assert attention.js_of_means(few, few_ref).low is None


def test_js_of_means_interval_holds_its_estimate_when_the_variants_barely_differ():
    """Two near-identical attentions (a variant within its pretrained length): every resample's JS exceeds the
    estimate, so a plain percentile interval would lie above it; the bias-corrected one holds it."""
    S, layers, heads, L = 10, 2, 2, 256
    rng = np.random.default_rng(0)
    p = random_distributions(6, (S, layers, heads, L))
    q = p * np.clip(1 + 0.05 * rng.standard_normal(p.shape), 0.01, None)
    q /= q.sum(-1, keepdims=True)
    mine, ref = reductions(p, q)
    got = attention.js_of_means(mine, ref)
    idx = np.random.default_rng(1).integers(0, S, (2000, S))
    resampled = [js_np(p.mean((1, 2))[i].mean(0), q.mean((1, 2))[i].mean(0)) for i in idx]
    assert np.percentile(resampled, 2.5) > got.estimate          # the plain percentile interval misses it
    assert 0 <= got.low <= got.estimate <= got.high


def summary_rows(cells, length=100):
    """attention rows for ``summary``: (label, rope type, estimate, low, high) against plain RoPE."""
    entropy = {"entropy": 2.0, "entropy_se": 0.1, "entropy_n": 10}
    return [{"length": length, "rope": label, "rope_type": kind, "reference": "rope", "js_mean_nats": e,
             "js_mean_nats_low": lo, "js_mean_nats_high": hi, "js_mean_nats_n": 10, **entropy}
            for label, kind, e, lo, hi in cells] + [
        {"length": length, "rope": "rope", "rope_type": "rope", "reference": "rope", "js_mean_nats": 0.0,
         "js_mean_nats_low": 0.0, "js_mean_nats_high": 0.0, "js_mean_nats_n": 10, **entropy}]


def test_summary_gives_the_numbers_and_the_claims_pairs_for_a_verdict():
    claim_holds = summary_rows([("pi x4", "pi", 0.05, 0.04, 0.06), ("ntk x4", "ntk", 0.001, 0.0005, 0.002),
                                ("yarn x4", "yarn", 0.002, 0.001, 0.003)])
    title, claim, finding, numbers = attention.summary(claim_holds, pretrained_length=200, reference_is_rope=True)
    assert "PI" in claim and "Table 1" in claim
    js, entropy = finding
    assert js == ("L=100: JS of means vs rope, nats: pi x4 0.0500 [0.0400, 0.0600] (n=10), ntk x4 0.0010 [0.0005, "
                  "0.0020] (n=10), yarn x4 0.0020 [0.0010, 0.0030] (n=10).")
    assert entropy.startswith("L=100: entropy of the last query's attention, nats (ln L = 4.61 is uniform): "
                              "pi x4 2.00 (SE 0.10, n=10), ")
    assert [(r["rope"], r["js_mean_nats"], r["js_mean_nats_n"]) for r in numbers["js_mean_nats"]] == [
        ("pi x4", 0.05, 10), ("ntk x4", 0.001, 10), ("yarn x4", 0.002, 10)]   # the reference itself is left out
    # the claim's pairs, with their intervals, for paper.py to call by stats.compare
    pairs = numbers["comparisons"]
    assert [(c["a"]["label"], c["b"]["label"], c["expected"]) for c in pairs] == [("pi x4", "ntk x4", "higher"),
                                                                                ("pi x4", "yarn x4", "higher")]
    assert (pairs[0]["a"]["low"], pairs[0]["b"]["high"], pairs[0]["b"]["n"]) == (0.04, 0.002, 10)
    assert pairs[0]["claim"] == "At L=100, PI's JS of means from plain RoPE is above ntk x4's"
    _, _, finding, numbers = attention.summary(claim_holds, 50, True)            # past the pretrained length
    assert "does not cover it" in finding[0] and numbers["comparisons"] == []
    _, _, finding, numbers = attention.summary(claim_holds, 200, False)          # another model's reference
    assert "no verdict" in finding[0] and numbers["comparisons"] == []


def test_entropy_and_per_distribution_js_carry_their_spread_over_samples():
    S, layers, heads, L = 5, 2, 3, 10
    p, q = random_distributions(4, (S, layers, heads, L)), random_distributions(5, (S, layers, heads, L))
    mine, ref = reductions(p, q)
    r = attention.summarize(mine, ref)
    h = -plogp(p).sum(-1)                                                          # (S, layers, heads)
    assert r["entropy_se"] == pytest.approx(np.std(h.mean((1, 2)), ddof=1) / math.sqrt(S), rel=1e-9)
    assert r["entropy_per_layer_se"] == pytest.approx(np.std(h.mean(2), axis=0, ddof=1) / math.sqrt(S), rel=1e-9)
    assert r["entropy_n"] == S
    per_sample = js_np(p, q).mean((1, 2))                                             # (S,)
    expected = bootstrap_mean(per_sample)
    assert r["js_per_distribution_nats"] == pytest.approx(per_sample.mean(), rel=1e-9)
    assert (r["js_per_distribution_nats_low"], r["js_per_distribution_nats_high"]) == pytest.approx(
        (expected.low, expected.high), rel=1e-9)
    assert r["js_per_distribution_nats_low"] < r["js_per_distribution_nats"] < r["js_per_distribution_nats_high"]


def test_reduction_against_another_architecture_has_no_pairs():
    mine = attention.Reduction(2, 4, 8)
    mine.add(torch.from_numpy(random_distributions(0, (2, 4, 8))), torch.from_numpy(random_distributions(1, (2, 2, 8))))
    assert math.isnan(attention.summarize(mine, mine)["js_per_distribution_nats"])


# ---------------------------------------------------------------------------------------------------------------
# The state a killed run resumes from
# ---------------------------------------------------------------------------------------------------------------

class Pairs:
    """A second tokenizer: one token per two characters, so a text has half as many tokens as bytes."""

    def encode(self, text, add_bos=None):
        data = text.encode("utf-8")
        return [data[i] * 256 + (data[i + 1] if i + 1 < len(data) else 0) for i in range(0, len(data), 2)]


def test_samples_come_from_distinct_documents_first_then_non_overlapping_windows():
    docs = [np.arange(n) + 1000 * i for i, n in enumerate([10, 50, 30, 50])]
    picks = attention.pick_samples(docs, [None], [None], [20, 25], 5)
    assert [(s.document, s.offset) for s in picks[20]] == [(1, 0), (2, 0), (3, 0), (1, 20), (3, 20)]
    assert [(s.document, s.offset) for s in picks[25]] == [(1, 0), (2, 0), (3, 0), (1, 25), (3, 25)]
    for samples in picks.values():
        for s in samples:
            L = len(s.ids[0])
            np.testing.assert_array_equal(s.ids[0], docs[s.document][s.offset:s.offset + L])
        spans = sorted((s.document, s.offset, s.offset + len(s.ids[0])) for s in samples)
        assert all(a[0] != b[0] or a[2] <= b[1] for a, b in zip(spans, spans[1:]))      # no two overlap
    with pytest.raises(RopeliteError, match="only 5 non-overlapping windows of 20 tokens in 4 documents, "
                                            "--samples asks for 6: use --samples 5 or fewer"):
        attention.pick_samples(docs, [None], [None], [20], 6)


def test_samples_tokenise_only_the_documents_they_need(count_calls):
    from ropelite.tokenizer import ByteTokenizer
    calls = count_calls(ByteTokenizer, "encode")
    picks = attention.pick_samples(["x" * 30, "y" * 5, "z" * 40, "w" * 40], [ByteTokenizer()], [257], [20], 2)
    assert [(s.document, s.offset) for s in picks[20]] == [(0, 0), (2, 0)] and len(calls) == 3


def test_another_tokenizer_reads_the_same_text():
    from ropelite.tokenizer import ByteTokenizer
    text = "".join(chr(97 + i % 26) for i in range(100))
    picks = attention.pick_samples([text], [ByteTokenizer(), Pairs()], [257, 65536], [20], 4)
    # Pairs has (100 - offset) / 2 tokens from a window's start: >= 20 only up to offset 60
    assert [s.offset for s in picks[20]] == [0, 20, 40, 60]
    for s in picks[20]:
        assert s.ids[0].tolist() == list(text[s.offset:s.offset + 20].encode())
        assert s.ids[1].tolist() == Pairs().encode(text[s.offset:s.offset + 40])
    with pytest.raises(RopeliteError, match="only 4 non-overlapping windows of 20 tokens under every tokenizer"):
        attention.pick_samples([text], [ByteTokenizer(), Pairs()], [257, 65536], [20], 5)


def test_state_round_trip_and_what_it_must_match(tmp_path):
    samples = [[np.arange(8)], [np.arange(8) + 1], [np.arange(8) + 2]]
    meta = attention.state_meta({"model": "m", "ropes": {"pi x4": {"factor": 4.0}}, "length": 8}, ["a", "b"], samples)
    assert meta["settings"]["length"] == 8 and len(set(meta["sample_hashes"])) == 3
    red = {}
    for label, seed in (("a", 0), ("b", 1)):
        red[label] = attention.Reduction(2, 4, 8)
        red[label].add(torch.from_numpy(random_distributions(seed, (2, 4, 8))), None)
    path = tmp_path / "state.npz"
    attention.save_state(path, {**meta, "sample_hashes": meta["sample_hashes"][:1]}, red)   # one sample done
    back = attention.load_state(path, meta)                                               # same run, all samples
    assert list(back) == ["a", "b"] and back["a"].samples == 1
    for label in red:
        for field in ("per_head_sum", "entropy_samples", "js_samples", "sample_means"):
            assert torch.equal(getattr(back[label], field), getattr(red[label], field))
    assert attention.load_state(path, {**meta, "labels": ["a", "c"]}) is None
    assert attention.load_state(path, {**meta, "settings": {**meta["settings"], "length": 9}}) is None
    other = attention.state_meta(meta["settings"], ["a", "b"], samples[1:])
    assert attention.load_state(path, other) is None                                      # other samples
    assert attention.load_state(tmp_path / "none.npz", meta) is None
    (tmp_path / "bad.npz").write_text("not a state")
    with pytest.raises(RopeliteError, match="is not an analyze.py attention state file"):
        attention.load_state(tmp_path / "bad.npz", meta)


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1: attention entropy of the generated tokens
# ---------------------------------------------------------------------------------------------------------------

def test_entropy_of_uniform_attention_is_ln_n(tiny_llama):
    """q = 0 gives scores 0, so the row of the query at position p is uniform over p + 1 keys: entropy ln(p+1).
    The token generated j-th comes from the row at position P - 1 + j (P = prompt length)."""
    model = tiny_llama(vocab_size=VOCAB)
    with torch.no_grad():
        for block in model.layers:
            block.self_attn.q_proj.weight.zero_()
    prompt = list(range(40))
    out, per_layer = attention.answer_with_entropy(model, prompt, max_new_tokens=6)
    assert len(out) == 6
    hand = sum(math.log(40 + j) for j in range(6)) / 6
    assert per_layer == pytest.approx([hand] * 2, rel=1e-6)


def test_entropy_matches_a_full_eager_forward(tiny_llama):
    """Algorithm 1 computed differently: one eager forward over prompt + answer with every row observed, the
    generated tokens' rows picked out, -sum p ln p by hand in numpy, mean over heads, then tokens."""
    model = tiny_llama(vocab_size=VOCAB)
    prompt = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(1)).tolist()[0]
    out, per_layer = attention.answer_with_entropy(model, prompt, max_new_tokens=5)
    rows = {}
    seq = torch.tensor([prompt + out[:-1]])
    with torch.no_grad():
        model(seq, eager=True, on_attention=lambda layer, pos, probs: rows.setdefault(layer, probs[0].numpy()))
    for layer, probs in rows.items():                               # (H, T, T)
        picked = probs[:, len(prompt) - 1:, :].astype(np.float64)    # (H, len(out), T)
        logs = np.log(np.where(picked > 0, picked, 1.0))
        assert per_layer[layer] == pytest.approx((-(picked * logs).sum(-1)).mean(), rel=1e-5)


def test_entropy_meter_averages_heads_then_rows():
    """Two calls for layer 0 (one row, then two), none for layer 1: the mean over the three rows of the head-mean
    entropy; a layer never observed is NaN."""
    meter = attention.EntropyMeter(2)
    uniform4 = torch.full((1, 2, 1, 4), 0.25)                      # H = ln 4 in both heads
    mixed = torch.tensor([[[[1.0, 0, 0, 0], [0.5, 0.5, 0, 0]], [[0.5, 0.5, 0, 0], [0.25] * 4]]])  # (1, 2, 2, 4)
    meter(0, torch.tensor([3]), uniform4)
    meter(0, torch.tensor([4, 5]), mixed)
    ln2 = math.log(2)
    hand = (2 * ln2 + (0 + ln2) / 2 + (ln2 + 2 * ln2) / 2) / 3
    per_layer = meter.per_layer()
    assert per_layer[0] == pytest.approx(hand, rel=1e-12) and math.isnan(per_layer[1])
