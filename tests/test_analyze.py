"""analyze.py: JS divergence and entropy against closed forms; the attention reduction against a brute-force
computation from full (eager, every row) attention matrices of separately loaded models; resume; the base bound
against a direct evaluation of B_m; frequency maps against hand values; one-line errors.
"""

import json
import math

import numpy as np
import pytest
import torch

import analyze
from ropelite import attention, bound
from ropelite.cli import run_script
from ropelite.hf import load_model, save_model
from ropelite.rope import RopeConfig
from ropelite.stats import entropy, js_divergence

LN2 = math.log(2)


# ---------------------------------------------------------------------------------------------------------------
# JS divergence and entropy
# ---------------------------------------------------------------------------------------------------------------

def test_js_is_zero_symmetric_and_at_most_ln2():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(200, 37, generator=g) ** 4          # skewed, some near zero
    q = torch.rand(200, 37, generator=g) ** 4
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    assert js_divergence(p, p).abs().max() < 1e-12
    assert torch.allclose(js_divergence(p, q), js_divergence(q, p), rtol=0, atol=1e-15)
    js = js_divergence(p, q)
    assert (js > 0).all() and (js <= LN2).all()


def test_js_of_disjoint_supports_is_ln2_and_of_a_hand_pair():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    q = torch.tensor([0.0, 0.0, 0.25, 0.75])
    assert float(js_divergence(p, q)) == pytest.approx(LN2, abs=1e-15)
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4); KL(p||m) = ln(4/3), KL(q||m) = (ln(2/3) + ln 2) / 2
    hand = (math.log(4 / 3) + (math.log(2 / 3) + math.log(2)) / 2) / 2
    assert float(js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))) == pytest.approx(hand, rel=1e-12)


def test_entropy_hand_values():
    assert float(entropy(torch.tensor([0.5, 0.25, 0.25]))) == pytest.approx(1.5 * LN2, rel=1e-12)
    assert float(entropy(torch.tensor([1.0, 0.0, 0.0]))) == 0.0
    assert float(entropy(torch.full((1000,), 1e-3, dtype=torch.float64))) == pytest.approx(math.log(1000), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# attention: the on-the-fly reduction against a brute force from full attention matrices
# ---------------------------------------------------------------------------------------------------------------

ORIGINAL = 16   # the tiny model's pretrained length: the lengths below exceed it, so dynamic differs from rope
DOCS = {"a": 10, "b": 50, "c": 30, "d": 50}   # token counts; sorted file order a, b, c, d


@pytest.fixture
def setup(tmp_path, tiny_llama):
    model = tiny_llama(rope=RopeConfig(theta=1e4, original_max_position_embeddings=ORIGINAL))
    path = tmp_path / "model"
    save_model(model, path)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    docs = {}
    for name, n in DOCS.items():
        docs[name] = rng.integers(0, 97, n).astype(np.int64)
        np.save(data / f"{name}.npy", docs[name])
    return path, data, docs


def np_js(p, q):
    """JS in nats written out in numpy: (KL(p||m) + KL(q||m)) / 2, terms with p = 0 dropped."""
    m = (p + q) / 2
    kl = lambda a: np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1) / m), 0), axis=-1)  # noqa: E731
    return (kl(p) + kl(q)) / 2


def np_entropy(p):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)


def full_last_rows(model, ids) -> np.ndarray:
    """(layers, heads, L): the last row of every full attention matrix of an eager forward with every row."""
    kept = {}

    def keep(layer, positions, probs):
        assert probs.shape[2] == probs.shape[3] == len(ids)     # the whole (L, L) matrix
        kept[layer] = probs[0, :, -1].double().numpy()

    with torch.no_grad():
        model(torch.as_tensor(ids).view(1, -1), eager=True, on_attention=keep)
    return np.stack([kept[i] for i in sorted(kept)])


VARIANTS = [("rope", {}, "rope"), ("pi", {"factor": 4}, "pi x4"), ("ntk", {"factor": 4, "base": 1e6}, "ntk base 1e+06"),
            ("yarn", {"factor": 4}, "yarn x4"), ("dynamic", {"factor": 4}, "dynamic x4")]


def test_reduction_equals_brute_force_on_full_attention(setup, tmp_path):
    path, data, docs = setup
    out = tmp_path / "out"
    analyze.main(["attention", "--model", str(path), "--rope", "rope", "pi", "ntk", "yarn", "dynamic",
                  "--factor", "4", "--base", "1e6", "--lengths", "24", "40", "--samples", "2",
                  "--data", str(data), "--out", str(out), "--dtype", "fp32"])   # fp32: against fp32 forwards
    result = json.loads((out / "attention.json").read_text())
    assert set(result["definitions"]) >= {"mean_distribution", "js_mean_nats", "js_per_distribution_nats"}
    rows = {(r["length"], r["rope"]): r for r in result["rows"]}
    assert len(rows) == 10 and (out / "attention.csv").read_text().count("\n") == 11
    picked = {24: ["b", "c"], 40: ["b", "d"]}   # the first two documents with >= L tokens, cut to L
    models = {label: load_model(path, rope, **kw).eval() for rope, kw, label in VARIANTS}  # no config swapping
    for L, names in picked.items():
        full = {label: np.stack([full_last_rows(m, docs[n][:L]) for n in names]) for label, m in models.items()}
        state = np.load(out / f"attention_L{L}.npz")
        labels = json.loads(str(state["meta"]))["labels"]
        ref = full["rope"]                                                 # (samples, layers, heads, L)
        for label, p in full.items():
            r = rows[(L, label)]
            i = labels.index(label)
            assert r["samples"] == 2 and r["distributions"] == 2 * 2 * 4
            np.testing.assert_allclose(state[f"{i}/per_head_sum"] / 2, p.mean(0), rtol=1e-5, atol=1e-8)
            mean, ref_mean = p.mean((0, 1, 2)), ref.mean((0, 1, 2))
            assert r["js_mean_nats"] == pytest.approx(np_js(mean, ref_mean), rel=1e-4, abs=1e-9)
            assert r["js_mean_bits"] == pytest.approx(r["js_mean_nats"] / LN2, rel=1e-12)
            assert r["js_per_distribution_nats"] == pytest.approx(np_js(p, ref).mean(), rel=1e-4, abs=1e-9)
            assert r["entropy_per_layer"] == pytest.approx(np_entropy(p).mean((0, 2)).tolist(), rel=1e-5)
            assert r["entropy_of_mean"] == pytest.approx(float(np_entropy(mean)), rel=1e-5)
            assert r["uniform_entropy"] == pytest.approx(math.log(L))
            assert r["js_per_distribution_nats"] >= r["js_mean_nats"] - 1e-12   # joint convexity
        assert rows[(L, "rope")]["js_mean_nats"] == 0
        assert rows[(L, "pi x4")]["js_mean_nats"] > 1e-4                      # the variants really differ
        assert (out / f"attention_L{L}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "attention_entropy.png").is_file()
    summary = json.loads((out / "attention_summary.json").read_text())   # the headline, for paper.py
    quoted = {(r["length"], r["rope"]): r for r in summary["numbers"]["js_mean_nats"]}
    assert set(quoted) == {key for key in rows if key[1] != "rope"} and summary["numbers"]["pretrained_length"] == ORIGINAL
    for key, r in quoted.items():   # two samples: the number and its n, too few for an interval
        assert (r["js_mean_nats"], r["js_mean_nats_n"], r["js_mean_nats_low"]) == (rows[key]["js_mean_nats"], 2, None)
    assert len(summary["finding"]) == 4 and all("(n=2)" in line for line in summary["finding"])
    assert summary["finding"][1].startswith("L=24: entropy of the last query's attention, nats (ln L = 3.18")
    for r in rows.values():   # two samples: no interval, no standard error, the n
        assert (r["js_per_distribution_nats_low"], r["entropy_se"], r["entropy_per_layer_se"]) == (None, None, None)
        assert r["entropy_n"] == r["js_mean_nats_n"] == 2


def test_reference_model(setup, tmp_path, tiny_llama):
    path, data, docs = setup
    other = tmp_path / "other"
    save_model(tiny_llama(seed=1), other)               # another model, pretrained length 64, its own RoPE
    narrow = tmp_path / "narrow"
    save_model(tiny_llama(seed=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32), narrow)
    for reference in (other, narrow):
        out = tmp_path / reference.name
        analyze.main(["attention", "--model", str(path), "--rope", "rope", "pi", "--lengths", "24",
                      "--samples", "2", "--data", str(data), "--reference-model", str(reference), "--out", str(out),
                      "--dtype", "fp32"])
        rows = {r["rope"]: r for r in json.loads((out / "attention.json").read_text())["rows"]}
        ref_label = f"{reference.name} rope (reference)"
        assert set(rows) == {"rope", "pi x4", ref_label}
        ref = np.stack([full_last_rows(load_model(reference).eval(), docs[n][:24]) for n in "bc"])
        mine = np.stack([full_last_rows(load_model(path).eval(), docs[n][:24]) for n in "bc"])
        assert rows["rope"]["js_mean_nats"] == pytest.approx(np_js(mine.mean((0, 1, 2)), ref.mean((0, 1, 2))),
                                                             rel=1e-4)
        assert rows[ref_label]["js_mean_nats"] == 0
        if reference is other:
            assert rows["rope"]["js_per_distribution_nats"] == pytest.approx(np_js(mine, ref).mean(), rel=1e-4)
        else:   # two heads against four: no (layer, head) pairs to compare
            assert rows["rope"]["js_per_distribution_nats"] is None


def test_one_long_document_gives_several_windows(tmp_path, tiny_llama):
    model = tiny_llama(rope=RopeConfig(theta=1e4, original_max_position_embeddings=ORIGINAL))
    save_model(model, tmp_path / "model")
    book = np.random.default_rng(1).integers(0, 97, 80).astype(np.int64)
    np.save(tmp_path / "book.npy", book)
    out = tmp_path / "out"
    analyze.main(["attention", "--model", str(tmp_path / "model"), "--rope", "rope", "--lengths", "24",
                  "--samples", "3", "--data", str(tmp_path / "book.npy"), "--out", str(out), "--dtype", "fp32"])
    result = json.loads((out / "attention.json").read_text())
    assert result["windows"] == {"24": [{"document": 0, "name": None, "token_offset": o} for o in (0, 24, 48)]}
    assert result["rows"][0]["samples"] == 3 and result["rows"][0]["documents"] == 1
    windows = np.stack([full_last_rows(load_model(tmp_path / "model").eval(), book[o:o + 24]) for o in (0, 24, 48)])
    state = np.load(out / "attention_L24.npz")
    np.testing.assert_allclose(state["0/per_head_sum"], windows.sum(0), rtol=1e-5, atol=1e-8)  # those windows ran
    # three samples: the entropy's standard error over them, by hand from the brute-force rows
    (row,) = result["rows"]
    per_sample = np_entropy(windows).mean((1, 2))                                  # (samples,)
    assert row["entropy_se"] == pytest.approx(np.std(per_sample, ddof=1) / math.sqrt(3), rel=1e-5)
    per_layer = np_entropy(windows).mean(2)                                        # (samples, layers)
    assert row["entropy_per_layer_se"] == pytest.approx(np.std(per_layer, axis=0, ddof=1) / math.sqrt(3), rel=1e-5)
    assert row["entropy_n"] == 3


def test_three_samples_give_every_number_its_interval(setup, tmp_path, capsys):
    """Every row: the JS of means and the per-distribution JS inside their intervals, the entropy with its
    standard error; the printed table shows them."""
    path, data, _ = setup
    out = tmp_path / "out"
    analyze.main(["attention", "--model", str(path), "--rope", "rope", "pi", "--factor", "4", "--lengths", "24",
                  "--samples", "3", "--data", str(data), "--out", str(out)])
    printed = capsys.readouterr().out
    rows = {r["rope"]: r for r in json.loads((out / "attention.json").read_text())["rows"]}
    pi = rows["pi x4"]
    assert pi["js_mean_nats_low"] <= pi["js_mean_nats"] <= pi["js_mean_nats_high"] and pi["js_mean_nats_n"] == 3
    assert (pi["js_per_distribution_nats_low"] <= pi["js_per_distribution_nats"] <= pi["js_per_distribution_nats_high"])
    for r in rows.values():
        assert r["entropy_se"] > 0 and len(r["entropy_per_layer_se"]) == 2
    assert {"js_mean_nats_low", "entropy_se"} <= set((out / "attention.csv").read_text().splitlines()[0].split(","))
    lines = printed.splitlines()
    js = lines[lines.index(next(line for line in lines if line.startswith("JS of mean"))) + 2]
    assert js.split()[:2] == ["24", "3"] and f"[{pi['js_mean_nats_low']:.4f}, {pi['js_mean_nats_high']:.4f}]" in js
    assert lines[1].split()[2:] == ["pi", "x4"]                        # the reference's own 0 is left out
    assert f"{pi['entropy']:.3f} ± {pi['entropy_se']:.3f}" in printed
    summary = json.loads((out / "attention_summary.json").read_text())
    assert f"pi x4 {pi['js_mean_nats']:.4f} [" in summary["finding"][0]
    assert f"pi x4 {pi['entropy']:.2f} (SE {pi['entropy_se']:.2f}, n=3)" in summary["finding"][1]


def test_books_are_the_default_and_named(setup, tmp_path, monkeypatch):
    path, _, docs = setup
    import ropelite.books
    monkeypatch.setattr(ropelite.books, "load_books", lambda: [docs[n] for n in "abcd"])  # no download
    assert analyze.parse_args(["attention"]).builtin == "books"
    out = tmp_path / "out"
    analyze.main(["attention", "--model", str(path), "--rope", "rope", "--lengths", "24", "--samples", "4",
                  "--out", str(out)])
    result = json.loads((out / "attention.json").read_text())
    assert result["settings"]["data"] == "builtin:books"
    names = ropelite.books.document_names()
    # a (10 tokens) has no window of 24; b, c, d first, then b's and d's second windows
    assert [(w["name"], w["token_offset"]) for w in result["windows"]["24"]] == [
        (names[1], 0), (names[2], 0), (names[3], 0), (names[1], 24)]
    for name in ("one.txt", "two.md"):
        (tmp_path / name).write_text("text")
    files = [str(tmp_path / "one.txt"), str(tmp_path / "two.md")]
    assert attention.corpus_names(files, "books", 2)[1] == ["one.txt", "two.md"]   # a text file is one document
    assert attention.corpus_names(files, "books", 1)[1] == [None]                  # one was empty: no names to guess


def test_figures_have_keys(tmp_path):
    per_head = np.full((3, 2, 16), 1 / 16)                                    # (layers, heads, L)
    fig = analyze.distribution_figure([("rope", per_head), ("pi x4", per_head)], 16, 10, "t")
    bars = [ax for ax in fig.axes if ax.get_ylabel().startswith("layer")]   # the colorbar's axes
    assert len(bars) == 1 and bars[0].get_ylim() == (0, 2)
    assert fig.axes[0].get_legend().get_texts()[0].get_text().startswith("mean over samples, layers, heads")
    rows = [{"rope": rope, "length": L, "entropy": e, "entropy_per_layer": [e, e]}
            for rope in ("rope", "yarn x4") for L, e in ((24, 2.0), (40, 2.5))]
    fig = analyze.entropy_figure(rows)
    per_layer, by_length = fig.axes
    notes = [t.get_text() for t in per_layer.texts]
    assert notes == [f"ln 24 = {math.log(24):.2f} (uniform)", f"ln 40 = {math.log(40):.2f} (uniform)"]
    lines = {line.get_label(): line for line in by_length.get_lines()}
    assert list(lines) == ["rope", "yarn x4", "ln L: uniform attention"]
    assert list(lines["rope"].get_xdata()) == [24, 40] and list(lines["rope"].get_ydata()) == [2.0, 2.5]
    np.testing.assert_allclose(lines["ln L: uniform attention"].get_ydata(), np.log([24, 40]))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["rope", "yarn x4", "L = 24", "L = 40",
                                                                  "ln L: uniform attention"]
    assert by_length.get_xlabel() == "sequence length L (tokens)" and "nats" in by_length.get_ylabel()
    assert lines["rope"].get_color() != lines["yarn x4"].get_color()
    styles = {line.get_linestyle() for line in per_layer.get_lines()[:4]}   # one style per length
    assert len(styles) == 2


def test_resume_after_a_kill(setup, tmp_path, count_calls):
    path, data, _ = setup
    argv = ["attention", "--model", str(path), "--rope", "rope", "pi", "--lengths", "24", "40", "--samples", "2",
            "--data", str(data)]
    calls = count_calls(attention, "last_rows")
    analyze.main(argv + ["--out", str(tmp_path / "full")])
    assert len(calls) == 8                              # 2 lengths x 2 samples x (rope, pi): rope is the reference
    full = json.loads((tmp_path / "full" / "attention.json").read_text())["rows"]
    calls.clear()
    calls.kill_at = 8                                   # dies in the second sample of length 40 (its pi run)
    with pytest.raises(KeyboardInterrupt):
        analyze.main(argv + ["--out", str(tmp_path / "killed")])
    calls.clear()
    calls.kill_at = 0
    analyze.main(argv + ["--out", str(tmp_path / "killed")])
    assert len(calls) == 2                              # only that sample ran again
    resumed = json.loads((tmp_path / "killed" / "attention.json").read_text())["rows"]
    assert resumed == full


# ---------------------------------------------------------------------------------------------------------------
# bound: Men et al.
# ---------------------------------------------------------------------------------------------------------------

def B(m: np.ndarray, dim: int, base: float) -> np.ndarray:
    """sum_i cos(m b^(-2i/d)), directly (no rope.py)."""
    theta = base ** (-2 * np.arange(dim // 2) / dim)
    return np.cos(np.outer(m, theta)).sum(1)


def reaches(dim, base, length) -> bool:
    return bool((B(np.arange(length + 1), dim, base) >= 0).all())


def test_bound_table_against_a_direct_scan(tmp_path):
    out = tmp_path / "bound"
    analyze.main(["bound", "--dim", "128", "--lengths", "512", "1024", "--plot-bases", "1e4", "--out", str(out)])
    result = json.loads((out / "bound.json").read_text())
    rows = {r["length"]: r for r in result["rows"]}
    assert set(rows) == {512, 1024}
    for L, r in rows.items():
        base = r["min_base"]
        assert reaches(128, base, L)
        # every base from 1 up to infeasible_below fails: a grid over the last 0.2 % below it finds no feasible
        # one, and the infimum is pinned to within the resolution
        assert r["open_gaps"] == 0 and r["infeasible_below"] <= base <= r["infeasible_below"] * (1 + 2e-7)
        below = np.linspace(r["infeasible_below"] / 1.002, r["infeasible_below"], 2001)[:-1]
        assert not [b for b in below if reaches(128, b, L)]
        assert r["min_base_context"] >= L
    assert rows[1024]["paper_base"] == 4.3e3 and rows[512]["paper_base"] is None
    assert rows[1024]["paper_base_reaches"] == reaches(128, 4.3e3, 1024)
    neg = np.flatnonzero(B(np.arange(2049), 128, 4.3e3) < 0)
    assert rows[1024]["paper_base_context"] == (2048 if neg.size == 0 else neg[0] - 1)
    models = {m["model"]: m for m in result["models"]}
    for name, dim, base in [("SmolLM2-135M", 64, 1e5), ("LLaMa-2-7B", 128, 1e4)]:
        first = np.flatnonzero(B(np.arange(1 << 14), dim, base) < 0)[0]
        assert models[name]["context_reached"] == first - 1
    assert (out / "bound.png").read_bytes()[:4] == b"\x89PNG" and (out / "bound.csv").is_file()


def test_bound_flags_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "bound"
    argv = ["bound", "--dim", "16", "--lengths", "64:128", "--theta", "500", "--plot-bases", "1e3", "--out", str(out)]
    analyze.main(argv)
    rows = json.loads((out / "bound.json").read_text())["rows"]
    assert [r["length"] for r in rows] == [64, 128] and rows[0]["paper_base"] is None
    first = np.flatnonzero(B(np.arange(1 << 14), 16, 500) < 0)[0]
    (model,) = json.loads((out / "bound.json").read_text())["models"]
    assert model == {"model": "theta=500", "dim": 16, "base": 500, "trained_length": None,
                     "context_reached": first - 1, "reaches_trained_length": None}
    monkeypatch.setattr(bound, "min_base_scan", lambda *a, **k: pytest.fail("recomputed a done length"))
    analyze.main(argv)


# ---------------------------------------------------------------------------------------------------------------
# freqs
# ---------------------------------------------------------------------------------------------------------------

def test_freqs_hand_values(tmp_path):
    out = tmp_path / "freqs"
    analyze.main(["freqs", "--dim", "128", "--theta", "1e4", "--original", "4096", "--factor", "16", "--base", "1e6",
                  "--rope", "rope", "pi", "ntk", "yarn", "dynamic", "llama3", "--out", str(out)])
    result = json.loads((out / "freqs.json").read_text())
    rows = {(r["rope"], r["pair"]): r for r in result["rows"]}
    assert len(rows) == 6 * 64 and (out / "freqs.csv").read_text().count("\n") == 6 * 64 + 1
    for i in range(64):
        theta = 1e4 ** (-2 * i / 128)
        assert rows[("rope", i)]["scale"] == pytest.approx(1)
        assert rows[("rope", i)]["wavelength"] == pytest.approx(2 * math.pi / theta)
        assert rows[("pi x16", i)]["scale"] == pytest.approx(16)
        assert rows[("ntk base 1e+06", i)]["scale"] == pytest.approx(100 ** (2 * i / 128))
        # dynamic at s * L = 65536: b' = b (16 * 65536 / 4096 - 15)^(d/(d-2)) = b 241^(128/126)
        assert rows[("dynamic x16", i)]["scale"] == pytest.approx(241 ** (128 / 126 * 2 * i / 128))
        # YaRN, d=128, b=1e4, L=4096: ramp from pair 20 to pair 46 (REFERENCE.md)
        ramp = min(max((i - 20) / 26, 0), 1)
        assert rows[("yarn x16", i)]["scale"] == pytest.approx(1 / (ramp / 16 + 1 - ramp))
        assert rows[("yarn x16", i)]["rotations_in_original_context"] == pytest.approx(
            4096 / rows[("yarn x16", i)]["wavelength"])
        # llama3: kept where the wavelength < L/4, divided by s where > L
        wavelength = 2 * math.pi / theta
        if wavelength < 1024:
            assert rows[("llama3 x16", i)]["scale"] == pytest.approx(1)
        elif wavelength > 4096:
            assert rows[("llama3 x16", i)]["scale"] == pytest.approx(16)
    factors = {v["rope"]: v["attention_factor"] for v in result["variants"]}
    assert factors["yarn x16"] == pytest.approx(0.1 * math.log(16) + 1) and factors["pi x16"] == 1
    assert (out / "freqs.png").read_bytes()[:4] == b"\x89PNG"


def test_freqs_reads_only_the_config(tmp_path, tiny_llama):
    path = tmp_path / "model"
    save_model(tiny_llama(), path)
    (path / "model.safetensors").unlink()              # no weights: freqs must not need them
    analyze.main(["freqs", "--model", str(path), "--rope", "pi", "--out", str(tmp_path / "o")])
    result = json.loads((tmp_path / "o" / "freqs.json").read_text())
    assert result["settings"] == {"source": str(path), "dim": 16, "theta": 1e4, "original": 64, "length": 256}
    assert [r["scale"] for r in result["rows"]] == pytest.approx([4.0] * 8)


def test_analyze_takes_a_yarn_checkpoints_own_factor_for_every_variant_and_says_so(tmp_path, tiny_llama, capsys):
    """The one factor rule (ropelite.cli.FACTOR_RULE) with analyze.py's default: a yarn x8 checkpoint's own variant
    keeps its 8, every other scaling variant is compared at the same 8 (a line names them); no default reaches a
    variant that needs none."""
    path = tmp_path / "model"
    model = tiny_llama()
    model.config = model.config.with_rope("yarn", factor=8.0)
    save_model(model, path)
    analyze.main(["freqs", "--model", str(path), "--rope", "rope", "pi", "yarn", "--out", str(tmp_path / "o")])
    assert capsys.readouterr().err.strip().splitlines() == ["rope: --factor not given, so pi run at s = 8 "
                                                            "(analyze.py's default)"]
    result = json.loads((tmp_path / "o" / "freqs.json").read_text())
    assert [v["rope"] for v in result["variants"]] == ["rope", "pi x8", "yarn x8"]
    assert result["settings"]["length"] == 8 * 64


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["attention", "--samples", "3", "--lengths", "40"],
     "error: only 2 non-overlapping windows of 40 tokens in 4 documents, --samples asks for 3: use --samples 2 or "
     "fewer, shorter --lengths, or --data with longer or more documents"),
    (["attention", "--lengths", "1"], "error: --lengths must be at least 2"),
    (["attention", "--lengths", "2k"], "error: bad --lengths value '2k'"),
    (["attention", "--lengths", "24.5"], "error: bad --lengths value '24.5': give whole numbers"),
    (["attention", "--bogus"], "error: analyze.py: unrecognized arguments: --bogus"),
    (["attention", "--samples", "two"], "error: analyze.py attention: argument --samples: invalid int value"),
    (["attention", "--rope", "rope", "pi", "--base", "1e6"], "error: a new base is an NTK setting"),
    (["attention", "--factor", "0.5"], "error: rope factor must be >= 1"),
    (["bound", "--lengths", "64:32"], "error: bad --lengths range '64:32'"),
    (["freqs", "--dim", "16", "--theta", "1e4", "--rope", "yarn", "--base", "1e6"],
     "error: a new base is an NTK setting; rope 'yarn' does not take one"),
    (["attention", "--model", "/nonexistent/model"], "error: model not found"),
    (["bound", "--dim", "7"], "error: --dim must be an even number"),
    (["freqs", "--rope", "foo"], "error: analyze.py freqs: argument --rope: invalid choice"),
    (["freqs", "--dim", "16", "--theta", "1e4", "--factor", "0.5"], "error: rope factor must be >= 1"),
    (["freqs", "--dim", "16", "--theta", "1e4", "--factor", "nan"], "error: rope factor must be >= 1"),
    (["freqs", "--dim", "16", "--theta", "1e4", "--factor", "0"], "error: rope factor must be >= 1"),
    (["freqs", "--dim", "16", "--theta", "1e4", "--factor", "-1"], "error: rope factor must be >= 1"),
    (["attention", "--factor", "inf"], "error: rope factor must be >= 1"),
    ([], "error: analyze.py: the following arguments are required"),
])
def test_bad_input_is_one_line(setup, tmp_path, capsys, argv, message):
    path, data, _ = setup
    if argv[:1] == ["attention"]:
        argv = argv + (["--model", str(path)] if "--model" not in argv else []) + ["--data", str(data)]
    with pytest.raises(SystemExit) as exit_:
        run_script(lambda: analyze.main(argv + (["--out", str(tmp_path / "o")] if argv else [])))
    assert exit_.value.code == 2
    *notes, err = capsys.readouterr().err.strip().splitlines()
    # the error comes last; before it only the notices of what a default chose: --dtype auto's, the factor's
    assert err.startswith(message)
    assert len(notes) <= 2 and all(n.startswith(("dtype: ", "rope: --factor not given")) for n in notes)


def test_token_ids_outside_the_vocabulary_are_one_line(setup, tmp_path, capsys):
    path, _, _ = setup
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([1, 2, 200, 3] * 10))
    with pytest.raises(SystemExit) as exit_:
        run_script(lambda: analyze.main(["attention", "--model", str(path), "--data", str(bad), "--lengths", "8",
                                  "--samples", "1", "--out", str(tmp_path / "o")]))
    assert exit_.value.code == 2
    *notes, err = capsys.readouterr().err.strip().splitlines()
    assert err == "error: token id 200 outside the model's vocabulary (97 ids)"
    # the error comes last; before it only the notices of what a default chose (--dtype auto, the factor)
    assert len(notes) <= 2 and all(n.startswith(("dtype: ", "rope: --factor not given")) for n in notes)


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        run_script(lambda: analyze.main(["bound", "--lengths", "1024", "--out", str(tmp_path / "file")]))
    expected = f"error: --out {tmp_path / 'file'} is a file, not a folder; choose another --out"
    assert capsys.readouterr().err.strip() == expected
