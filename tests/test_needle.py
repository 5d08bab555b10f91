"""needle.py: needle placement at sentence boundaries, scoring, the entropy of a whole cell against its closed
form, resume after a completed and a killed run, one-line errors. (The grid grammar is tested in test_cli.py, the
entropy meter in test_attention.py.)

The model is a tiny random LLaMa with a byte-level tokenizer (one token per ASCII character), so token indices
are character indices and placements can be checked on the text itself.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

import needle
from ropelite.cli import run
from ropelite.errors import RopeliteError
from ropelite.hf import save_model
from ropelite.tokenizer import load_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 256 + len(SPECIALS)
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SENTENCES = ["Use os.path to join paths.", "It works!", "Does it really?", "Yes, version 3.14 does.",
             "Short.", "A much longer sentence follows here, with commas, clauses and no end in sight."]


def write_byte_tokenizer(path: Path) -> None:
    """Byte-level BPE without merges: every byte is a token; ChatML special tokens; a chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHAT}))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(path)
    return load_tokenizer(path)


@pytest.fixture
def model_dir(tmp_path, tiny_llama):
    """make(zero_q=False) -> a saved tiny model with the byte tokenizer; zero_q makes every attention uniform."""
    def make(zero_q: bool = False) -> Path:
        model = tiny_llama(vocab_size=VOCAB, eos_token_id=VOCAB - 1)
        if zero_q:
            with torch.no_grad():
                for block in model.layers:
                    block.self_attn.q_proj.weight.zero_()
        path = tmp_path / ("zero_q" if zero_q else "model")
        save_model(model, path)
        write_byte_tokenizer(path)
        return path
    return make


@pytest.fixture
def haystack_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "hay.txt"
    path.write_text(" ".join(SENTENCES[i] for i in rng.integers(0, len(SENTENCES), 400)))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------

def test_answer_words_and_recall():
    expected = needle.answer_words(needle.NEEDLE, needle.ANSWER_PREFIX)
    assert expected == ["eat", "sandwich", "sit", "dolores", "park", "sunny", "day"]
    assert needle.recall(" eat a sandwich and sit in Dolores Park on a sunny day.", expected) == 1.0
    assert needle.recall(" to EAT a Sandwich!", expected) == pytest.approx(2 / 7)
    assert needle.recall(" eat, sit; park... day", expected) == pytest.approx(4 / 7)   # >= 0.5: passes
    assert needle.recall(" sandwiches in the park", expected) == pytest.approx(1 / 7)  # whole words only
    assert needle.recall("", expected) == 0.0
    assert needle.answer_words("x", "y", answer="The Eiffel tower, in Paris.") == ["eiffel", "tower", "paris"]
    with pytest.raises(RopeliteError, match="give --answer"):
        needle.answer_words("Paris is lovely.", needle.ANSWER_PREFIX)


# ---------------------------------------------------------------------------------------------------------------
# Needle placement
# ---------------------------------------------------------------------------------------------------------------

def test_sentence_starts(tokenizer):
    text = "Use os.path now. It works! Really? \"Yes.\" v3.14 is it."
    ids = np.array(tokenizer.encode(text))
    assert len(ids) == len(text)
    starts = np.flatnonzero(needle.sentence_starts(ids, tokenizer)).tolist()
    # before the space that follows '.', '!', '?' or '."'; never inside os.path or 3.14; the very end counts
    assert starts == [0, text.index(" It"), text.index(" Really"), text.index(" \"Yes"), text.index(" v3"),
                      len(text)]


@pytest.mark.parametrize("depth", [0, 10, 25, 50, 75, 90, 100])
def test_needle_lands_at_depth_on_a_sentence_boundary(tokenizer, haystack_file, depth):
    length, max_new = 2000, 8
    docs = needle.load_documents([str(haystack_file)])
    hay = needle.build_haystack(docs, tokenizer, [1000, length], needle.NEEDLE, needle.QUESTION,
                                needle.ANSWER_PREFIX, max_new)
    ids, needle_at, context, pos = hay.prompt(length, depth)
    text = tokenizer.decode(ids)
    assert len(ids) + max_new <= length
    assert len(ids) + max_new > length - max(map(len, SENTENCES)) - 2  # only the last partial sentence is cut
    assert text.endswith(needle.ANSWER_PREFIX) and needle.QUESTION in text
    # the needle sits at needle_at, i.e. pos tokens into the context, right after a complete sentence
    assert tokenizer.decode(ids[needle_at:needle_at + len(hay.needle)]) == " " + needle.NEEDLE
    haystack = haystack_file.read_text()
    before = tokenizer.decode(ids[needle_at - pos:needle_at])
    assert haystack.startswith(before)
    assert pos == 0 or (before[-1] in ".!?" and haystack[pos] == " ")
    # ... and it is the last sentence boundary at or before depth% of the context (found here on the text)
    target = round(depth / 100 * context)
    boundaries = [0] + [m.start() + 1 for m in re.finditer(r"[.!?] ", haystack)]
    assert pos == max(b for b in boundaries if b <= target)
    assert target - pos < max(map(len, SENTENCES)) + 1
    assert haystack[context - 1] in ".!?" and haystack[context] == " "  # the context ends with a whole sentence
    if depth == 100:
        assert pos == context


def test_short_haystack_is_repeated(tokenizer, tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("One sentence. Two sentences.")
    docs = needle.load_documents([str(tmp_path / "tiny.txt")])
    hay = needle.build_haystack(docs, tokenizer, [600], needle.NEEDLE, needle.QUESTION, needle.ANSWER_PREFIX, 4)
    assert "repeating it" in capsys.readouterr().err
    ids, *_ = hay.prompt(600, 50)
    assert "Two sentences.\n\nOne sentence." in tokenizer.decode(ids)


# ---------------------------------------------------------------------------------------------------------------
# The script: outputs, hand entropy per cell, resume, errors
# ---------------------------------------------------------------------------------------------------------------

def read(out: Path) -> list[dict]:
    return json.loads((out / "needle.json").read_text())


def test_cell_entropy_is_the_hand_value(model_dir, tmp_path):
    out = tmp_path / "out"
    needle.main(["--model", str(model_dir(zero_q=True)), "--rope", "yarn", "--factor", "4",
                 "--lengths", "500", "--depths", "50", "--max-new-tokens", "5", "--out", str(out)])
    (row,) = read(out)
    hand = sum(math.log(row["tokens"] + j) for j in range(row["generated"])) / row["generated"]
    assert row["entropy"] == pytest.approx(hand, rel=1e-6)
    assert row["entropy_per_layer"] == pytest.approx([hand] * 2, rel=1e-6)
    assert row["rope"] == "yarn x4" and row["tokens"] + 5 <= 500


def test_resume_skips_done_cells_and_survives_a_kill(model_dir, tmp_path, count_calls):
    path = str(model_dir())
    argv = ["--model", path, "--lengths", "450", "600", "--depths", "0", "100", "--max-new-tokens", "3"]
    calls = count_calls(needle, "answer_with_entropy")
    out = tmp_path / "full"
    needle.main(argv + ["--out", str(out)])
    full = read(out)
    assert len(calls) == 4 and len(full) == 4
    assert {(r["length"], r["depth"]) for r in full} == {(450, 0), (450, 100), (600, 0), (600, 100)}
    assert set(full[0]) >= {"length", "depth", "tokens", "needle_position", "answer", "score", "pass", "entropy",
                            "entropy_per_layer", "seconds"}
    assert (out / "needle.csv").read_text().count("\n") == 5
    (png,) = out.glob("needle_rope_*.png")
    assert png.read_bytes()[:4] == b"\x89PNG"

    calls.clear()
    needle.main(argv + ["--out", str(out)])  # all done: nothing runs
    assert calls == [] and read(out) == full

    calls.clear()
    calls.kill_at, out = 3, tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        needle.main(argv + ["--out", str(out)])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read(out)) == strip(full[:2])  # the two finished cells survived
    calls.clear()
    calls.kill_at = 0
    needle.main(argv + ["--out", str(out)])
    assert len(calls) == 2
    assert strip(read(out)) == strip(full)

    calls.clear()
    needle.main(argv[:-1] + ["2", "--out", str(out)])  # other settings: every cell runs, old rows are kept
    assert len(calls) == 4 and len(read(out)) == 8
    assert len(set(json.loads((out / "needle_settings.json").read_text()))) == 2


@pytest.mark.parametrize("extra, message", [
    (["--lengths", "100"], "error: length 100 is too short"),
    (["--model", "/nonexistent/model"], "error: model not found"),
    (["--depths", "120"], "error: --depths are percentages"),
    (["--depths", "0:100:x"], "error: bad --depths value '0:100:x'"),
    (["--bogus"], "error: needle.py: unrecognized arguments: --bogus"),
    (["--rope", "yarn", "--base", "1e6"], "error: a new base is an NTK setting; rope 'yarn' does not take one"),
    (["--base", "1e6"], "error: a new base is an NTK setting; rope 'rope' does not take one"),
    (["--rope", "pi", "--factor", "0.5"], "error: rope factor must be >= 1"),
])
def test_bad_input_is_one_line(model_dir, tmp_path, capsys, extra, message):
    argv = ["--model", str(model_dir()), "--out", str(tmp_path / "o"), *extra]
    with pytest.raises(SystemExit) as exit_:
        run(lambda: needle.main(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
