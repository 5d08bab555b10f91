"""ropelite.haystack: scoring (needle recall, the passkey's first integer), the keys, the sample rule for the
haystack, sentence boundaries, needle and pass-key placement (depth 0 included), the prompt with and without the
chat template, the trained length, and the heatmap's dashed line per panel.

The tokenizer is byte-level (one token per ASCII character), so token indices are character indices and
placements can be checked on the text itself.
"""

import functools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ropelite import haystack as hs
from ropelite.data import load_documents
from ropelite.errors import RopeliteError
from ropelite.stats import bootstrap_mean, wilson
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
def haystack_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "hay.txt"
    path.write_text(" ".join(SENTENCES[i] for i in rng.integers(0, len(SENTENCES), 400)))
    return path


def needle_haystack(tokenizer, path, lengths, max_new=8, chat=True):
    docs = load_documents([str(path)])
    make = functools.partial(hs.haystack_ids, docs, [str(path)], tokenizer, VOCAB)
    return hs.build_haystack(make, tokenizer, lengths, hs.NEEDLE_TEMPLATE, hs.QUESTION, hs.ANSWER_PREFIX,
                             hs.NEEDLE, max_new, chat)


def passkey_haystack(tokenizer, lengths, max_new=10, chat=False):
    return hs.passkey_haystack(tokenizer, lengths, max_new, chat)


# ---------------------------------------------------------------------------------------------------------------
# Scoring and keys
# ---------------------------------------------------------------------------------------------------------------

def test_answer_words_and_recall():
    expected = hs.answer_words(hs.NEEDLE, hs.ANSWER_PREFIX)
    assert expected == ["eat", "sandwich", "sit", "dolores", "park", "sunny", "day"]
    assert hs.recall(" eat a sandwich and sit in Dolores Park on a sunny day.", expected) == 1.0
    assert hs.recall(" to EAT a Sandwich!", expected) == pytest.approx(2 / 7)
    assert hs.recall(" eat, sit; park... day", expected) == pytest.approx(4 / 7)   # >= 0.5: passes
    assert hs.recall(" sandwiches in the park", expected) == pytest.approx(1 / 7)  # whole words only
    assert hs.recall("", expected) == 0.0
    assert hs.answer_words("x", "y", answer="The Eiffel tower, in Paris.") == ["eiffel", "tower", "paris"]
    with pytest.raises(RopeliteError, match="give --answer"):
        hs.answer_words("Paris is lovely.", hs.ANSWER_PREFIX)


@pytest.mark.parametrize("answer, found", [
    (" 12345. Remember it.", 12345),
    ("The pass key is 12345.", 12345),
    ("1234 5", 1234),                        # a space ends the integer
    (" the key, as asked, is 71432", 71432),  # leading text is skipped
    (" 007", 7),
    (" 12,345", 12),
    (" -4", 4),
    (" no digits at all.", None),
    ("", None),
])
def test_first_integer_is_the_passkey_rule(answer, found):
    assert hs.first_integer(answer) == found


def test_passkeys_are_distinct_deterministic_five_digit_and_per_cell():
    keys = hs.passkeys(0, 1000, 50, 1000)  # 1000 draws from 90000 values: ~5 repeats expected without the check
    assert len(set(keys)) == 1000 and all(10_000 <= k <= 99_999 for k in keys)
    assert hs.passkeys(0, 1000, 50, 1000) == keys
    assert hs.passkeys(0, 1000, 50, 5) == keys[:5]  # more trials keep the first ones
    others = [hs.passkeys(1, 1000, 50, 5), hs.passkeys(0, 2000, 50, 5), hs.passkeys(0, 1000, 12.5, 5)]
    assert all(o != keys[:5] for o in others) and others[0] != others[1]


# ---------------------------------------------------------------------------------------------------------------
# The haystack: sample rule, pieces, filler
# ---------------------------------------------------------------------------------------------------------------

def test_haystack_follows_the_sample_rule_and_records_its_pieces(tokenizer, capsys):
    docs, names = ["Short one.", "B" * 50, "C" * 80], ["a", "b", "c"]
    ids, pieces = hs.haystack_ids(docs, names, tokenizer, VOCAB, 40)
    assert tokenizer.decode(ids) == "B" * 40 and pieces == [hs.Piece("b", 0, 40)]  # the first long enough
    assert hs.used_pieces(pieces, 30) == [["b", 0, 30]]
    ids, pieces = hs.haystack_ids(docs[:2], names[:2], tokenizer, VOCAB, 134)  # none is: all, repeated
    assert tokenizer.decode(ids) == ("Short one.\n\n" + "B" * 50 + "\n\n") * 2 + "Short "
    assert [(p.document, p.at) for p in pieces] == [("a", 0), ("b", 12), ("a", 64), ("b", 76), ("a", 128)]
    assert hs.used_pieces(pieces, 70) == [["a", 0, 10], ["b", 0, 50], ["a", 0, 6]]
    assert "repeating them" in capsys.readouterr().err
    with pytest.raises(RopeliteError, match="token id 300 outside the model's vocabulary"):
        hs.haystack_ids([np.array([1, 300])], ["x"], tokenizer, VOCAB, 2)


def test_filler_is_the_repeated_text(tokenizer):
    ids, pieces = hs.filler_ids(tokenizer, 500)
    assert len(ids) == 500 and pieces == [hs.Piece("filler", 0, 500)]
    assert tokenizer.decode(ids) == " ".join([hs.FILLER] * 6)[:500]


def test_sentence_starts(tokenizer):
    text = "Use os.path now. It works! Really? \"Yes.\" v3.14 is it."
    ids = np.array(tokenizer.encode(text))
    assert len(ids) == len(text)
    starts = np.flatnonzero(hs.sentence_starts(ids, tokenizer)).tolist()
    # before the space that follows '.', '!', '?' or '."'; never inside os.path or 3.14; the very end counts
    assert starts == [0, text.index(" It"), text.index(" Really"), text.index(" \"Yes"), text.index(" v3"),
                      len(text)]


# ---------------------------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [0, 10, 25, 50, 75, 90, 100])
def test_needle_lands_at_depth_on_a_sentence_boundary(tokenizer, haystack_file, depth):
    length, max_new = 2000, 8
    hay = needle_haystack(tokenizer, haystack_file, [1000, length], max_new)
    ids, needle_at, context, pos = hay.prompt(length, depth, hs.NEEDLE)
    text = tokenizer.decode(ids)
    assert len(ids) + max_new <= length
    assert len(ids) + max_new > length - max(map(len, SENTENCES)) - 2  # only the last partial sentence is cut
    assert text.endswith(hs.ANSWER_PREFIX) and hs.QUESTION in text
    # the needle sits at needle_at, i.e. pos tokens into the context, right after a complete sentence (after a
    # space), or first in the context (then followed by a newline, not glued to the first sentence)
    placed = tokenizer.decode(ids[needle_at:needle_at + len(hay.needle_ids(hs.NEEDLE, pos))])
    assert placed == (" " + hs.NEEDLE if pos else hs.NEEDLE + "\n")
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
    if depth == 0:
        assert f"<document>\n{hs.NEEDLE}\n{haystack[:20]}" in text


def test_short_haystack_is_repeated(tokenizer, tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("One sentence. Two sentences.")
    hay = needle_haystack(tokenizer, tmp_path / "tiny.txt", [600], 4)
    assert "repeating them" in capsys.readouterr().err
    ids, *_ = hay.prompt(600, 50, hs.NEEDLE)
    assert "Two sentences.\n\nOne sentence." in tokenizer.decode(ids)


@pytest.mark.parametrize("depth", [0, 20, 50, 80, 100])
def test_passkey_prompt_puts_the_key_at_depth(tokenizer, depth):
    length, key = 1500, 48213
    hay = passkey_haystack(tokenizer, [1000, length])
    line = hs.PASSKEY_LINE.format(key=key)
    ids, key_at, context, pos = hay.prompt(length, depth, line)
    text = tokenizer.decode(ids)
    assert len(ids) + 10 <= length
    assert text.startswith("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                           "them. I will quiz you about the important information there.\n")
    assert text.endswith("\nWhat is the pass key? The pass key is")  # plain prompt: the reference's last line
    assert text.count(str(key)) == 2
    # the key line starts at token pos of the context: within one filler sentence of depth% of it
    start = text.index("The pass key is")
    instruction = len(hay.before)
    assert start - (pos > 0) == key_at == instruction + pos
    assert 0 <= round(depth / 100 * context) - pos <= max(len(s) + 1 for s in hs.FILLER.split(". "))
    # ... on a sentence boundary: after a whole filler sentence and a space, or first, with a newline after it
    filler = " ".join([hs.FILLER] * 50)
    assert text[key_at - pos:key_at] == filler[:pos]
    if pos:
        assert text[key_at - 1] == "." and text[key_at:start] == " " and filler[pos] == " "
    else:
        assert text[start + len(line)] == "\n"
    assert text[start + len(line)].isspace()


def test_chat_and_plain_prompts(tokenizer):
    chat = passkey_haystack(tokenizer, [600], chat=True)
    ids, *_ = chat.prompt(600, 50, hs.PASSKEY_LINE.format(key=12345))
    rendered = tokenizer.backend.decode(ids, skip_special_tokens=False)  # decode() would drop the specials
    assert rendered.startswith("<|im_start|>user\nThere is an important info")
    assert rendered.endswith("What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is")
    plain, *_ = passkey_haystack(tokenizer, [600], chat=False).prompt(600, 50, hs.PASSKEY_LINE.format(key=12345))
    assert "<|im_start|>" not in tokenizer.backend.decode(plain, skip_special_tokens=False)
    assert rendered.count("12345") == 2
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(RopeliteError, match="no chat template"):
            passkey_haystack(tokenizer, [600], chat=True)
    finally:
        tokenizer.chat_template = template


def test_too_short_length_is_an_error(tokenizer):
    with pytest.raises(RopeliteError, match="length 200 is too short"):
        passkey_haystack(tokenizer, [200, 1000])


# ---------------------------------------------------------------------------------------------------------------
# Where the documents come from
# ---------------------------------------------------------------------------------------------------------------

def test_haystack_documents_name_each_document(tmp_path, monkeypatch):
    monkeypatch.setattr(hs.books, "documents", lambda: [("alice", "Down the hole."), ("lcet10", "Ten.")])
    assert hs.haystack_documents(["books"]) == (["Down the hole.", "Ten."], ["alice", "lcet10"], hs.books.CORPUS)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("First file.")
    (tmp_path / "folder" / "b.txt").write_text("Second file.")
    (tmp_path / "one.txt").write_text("A file of its own.")
    folder, one = str(tmp_path / "folder"), str(tmp_path / "one.txt")
    docs, names, corpus = hs.haystack_documents([one, folder])
    assert docs == ["A file of its own.", "First file.", "Second file."] and corpus == "files"
    assert names == [one, f"{folder}[0]", f"{folder}[1]"]


def test_haystack_maker_picks_filler_or_documents(tokenizer, tmp_path):
    make, corpus = hs.haystack_maker(["filler"], tokenizer, VOCAB)
    assert corpus == "filler" and tokenizer.decode(make(30)[0]) == hs.FILLER[:30]
    (tmp_path / "hay.txt").write_text("B" * 50)
    make, corpus = hs.haystack_maker([str(tmp_path / "hay.txt")], tokenizer, VOCAB)
    ids, pieces = make(40)
    assert corpus == "files" and tokenizer.decode(ids) == "B" * 40
    assert pieces == [hs.Piece(str(tmp_path / "hay.txt"), 0, 40)]


# ---------------------------------------------------------------------------------------------------------------
# One cell of each task
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def uniform_model(tiny_llama):
    """A tiny model over the byte vocabulary whose attention is uniform (q = 0): a query at position t has
    entropy ln(t + 1), so a cell's entropy has a closed form."""
    model = tiny_llama(vocab_size=VOCAB, eos_token_id=VOCAB - 1)
    with torch.no_grad():
        for block in model.layers:
            block.self_attn.q_proj.weight.zero_()
    return model


def hand_entropy(prompt_tokens: int, generated: int) -> float:
    """Algorithm 1 under uniform attention: answer token j is produced by the query at position prompt + j - 1,
    which sees prompt + j keys; the mean over the answer's tokens."""
    return sum(math.log(prompt_tokens + j) for j in range(generated)) / generated


def answering(tokenizer, answer):
    """A stand-in for answer_with_entropy that answers ``answer(prompt text)`` with entropy 1.0 in both layers."""
    return lambda model, ids, max_new, eos: (tokenizer.encode(answer(tokenizer.decode(ids)), add_bos=False), [1.0, 1.0])


def test_needle_cell_entropy_is_the_hand_value(tokenizer, haystack_file, uniform_model):
    hay = needle_haystack(tokenizer, haystack_file, [500], max_new=5)
    expected = hs.answer_words(hs.NEEDLE, hs.ANSWER_PREFIX)
    cell = hs.needle_cell(uniform_model, hay, 500, 50, hs.NEEDLE, expected, 0.5)
    hand = hand_entropy(cell["tokens"], cell["generated"])
    assert cell["generated"] <= 5 and cell["tokens"] + 5 <= 500
    assert cell["entropy"] == pytest.approx(hand, rel=1e-6)
    assert cell["entropy_per_layer"] == pytest.approx([hand] * 2, rel=1e-6)
    assert cell["haystack"] == [[str(haystack_file), 0, cell["context_tokens"]]]
    assert cell["score"] == round(hs.recall(cell["answer"], expected), 4) and cell["trials"] == 1


@pytest.mark.parametrize("pass_recall, passes", [(0.4, True), (0.5, False)])
def test_needle_cell_passes_at_its_recall_threshold(tokenizer, haystack_file, monkeypatch, pass_recall, passes):
    monkeypatch.setattr(hs, "answer_with_entropy", answering(tokenizer, lambda prompt: " eat a sandwich, then sit"))
    hay = needle_haystack(tokenizer, haystack_file, [500], max_new=30)
    cell = hs.needle_cell(None, hay, 500, 50, hs.NEEDLE, hs.answer_words(hs.NEEDLE, hs.ANSWER_PREFIX), pass_recall)
    assert cell["answer"] == " eat a sandwich, then sit" and cell["score"] == round(3 / 7, 4)  # eat, sandwich, sit
    assert cell["pass"] is passes and cell["pass_rate"] == float(passes)


def test_passkey_cell_entropy_is_the_hand_value(tokenizer, uniform_model):
    hay = passkey_haystack(tokenizer, [500], max_new=4)
    keys = hs.passkeys(0, 500, 50, 3)
    cell = hs.passkey_cell(uniform_model, hay, 500, 50, keys)
    assert cell["keys"] == keys and cell["trials"] == 3 and len(cell["answers"]) == 3
    assert cell["found"] == [hs.first_integer(a) for a in cell["answers"]]
    hands = [hand_entropy(n, g) for n, g in zip(cell["tokens"], cell["generated"])]
    assert cell["entropy_trials"] == pytest.approx(hands, rel=1e-6)
    assert cell["entropy"] == pytest.approx(sum(hands) / 3, rel=1e-6)
    assert cell["entropy_per_layer"] == pytest.approx([sum(hands) / 3] * 2, rel=1e-6)
    assert all(n + 4 <= 500 for n in cell["tokens"]) and cell["haystack"][0][:2] == ["filler", 0]
    sentence = max(map(len, hs.FILLER.split(". "))) + 2  # tokens: one filler sentence
    assert all(0 <= 50 - d <= 100 * sentence / c for d, c in zip(cell["key_depth"], cell["context_tokens"]))


def test_passkey_cell_scores_each_trial_by_its_own_key(tokenizer, monkeypatch):
    keys = hs.passkeys(0, 500, 50, 3)
    # answers the key hidden in the prompt for the first key only, and 11111 for the others
    monkeypatch.setattr(hs, "answer_with_entropy", answering(
        tokenizer, lambda prompt: f" {keys[0]}." if str(keys[0]) in prompt else " 11111 or so"))
    cell = hs.passkey_cell(None, passkey_haystack(tokenizer, [500], max_new=8), 500, 50, keys)
    assert cell["found"] == [keys[0], 11111, 11111] and cell["passed"] == 1 and cell["pass_rate"] == 1 / 3
    assert hs.trial_outcomes(cell) == [(1.0, True), (1.0, False), (1.0, False)]


# ---------------------------------------------------------------------------------------------------------------
# What a grid shows
# ---------------------------------------------------------------------------------------------------------------

def needle_row(length, passed, entropy):
    return {"length": length, "depth": 50, "pass": passed, "pass_rate": float(passed), "trials": 1,
            "entropy": entropy}


def test_grid_findings_count_trials_with_wilson_intervals_and_name_each_reversal():
    # 1000: 2 pass (entropy 2, 3) / 1 fails (5): failures higher; 2000: 1 passes (6) / 2 fail (4, 4): reversed;
    # 4000: every cell fails
    rows = [needle_row(1000, True, 2.0), needle_row(1000, True, 3.0), needle_row(1000, False, 5.0),
            needle_row(2000, True, 6.0), needle_row(2000, False, 4.0), needle_row(2000, False, 4.0),
            needle_row(4000, False, 7.0), needle_row(4000, False, 7.0), needle_row(4000, False, 7.0)]
    lines, numbers = hs.grid_findings(rows, [1000, 2000, 4000], 1500)
    assert lines[0] == "3/9 cells pass over 3 lengths: pass rate 0.33 [0.12, 0.65] (n=9)."   # Wilson of 3/9
    assert lines[1] == ("Within the training length 1500: 2/3, 0.67 [0.21, 0.94] (n=3); past it: 1/6, "
                        "0.17 [0.03, 0.56] (n=6).")
    # per length: the standard error of (2, 3, 5) is sqrt(7/3) / sqrt(3) = 0.88, of (6, 4, 4) 0.67, of (7, 7, 7) 0
    assert lines[2:5] == [
        "1000 tokens: 2/3 cells pass, 0.67 [0.21, 0.94] (n=3); mean attention entropy 3.33 nats (SE 0.88, n=3 "
        "cells); failing 5.00 (n=1); passing 2.50 (n=2).",
        "2000 tokens (past the training length): 1/3 cells pass, 0.33 [0.06, 0.79] (n=3); mean attention entropy "
        "4.67 nats (SE 0.67, n=3 cells); failing 4.00 (n=2); passing 6.00 (n=1).",
        "4000 tokens (past the training length): 0/3 cells pass, 0.00 [0.00, 0.56] (n=3); mean attention entropy "
        "7.00 nats (SE 0.00, n=3 cells); failing 7.00 [7.00, 7.00] (n=3)."]
    failing, passing = bootstrap_mean([5.0, 4.0, 4.0, 7.0, 7.0, 7.0]), bootstrap_mean([2.0, 3.0, 6.0])
    assert lines[5] == (f"Mean attention entropy over every length, {failing.text()} nats over the failing cells, "
                        f"{passing.text()} over the passing ones: higher for the failing ones; per length, the "
                        "other way at 2000 (failing 4.00, passing 6.00).")
    assert lines[5].startswith("Mean attention entropy over every length, 5.67 [") and "3.67 [" in lines[5]
    assert numbers["passed"] == 3 and numbers["pass_rate_n"] == 9 and numbers["unit"] == "cells"
    assert numbers["pass_rate_low"] == pytest.approx(0.1206, abs=1e-4)
    assert (numbers["entropy_fail_n"], numbers["entropy_pass_n"]) == (6, 3)
    per_length = numbers["per_length"]
    assert [(r["length"], r["passed"], r["failed"], r["pass_rate_n"]) for r in per_length] == [
        (1000, 2, 1, 3), (2000, 1, 2, 3), (4000, 0, 3, 3)]
    assert per_length[0]["entropy_se"] == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))
    assert per_length[2]["entropy_pass"] is None and per_length[2]["entropy_fail"] == 7.0
    for r in per_length:   # each pass rate inside its interval
        assert r["pass_rate_low"] <= r["pass_rate"] <= r["pass_rate_high"]
    # for paper.py: failing above passing, pooled (no length has 3 of each, so no per-length comparison)
    (pooled,) = numbers["comparisons"]
    assert pooled["expected"] == "higher" and (pooled["a"]["label"], pooled["b"]["label"]) == ("failing", "passing")
    assert (pooled["a"]["estimate"], pooled["a"]["low"], pooled["b"]["n"]) == (failing.estimate, failing.low, 3)


def test_grid_findings_compare_at_each_length_with_three_of_each():
    rows = [needle_row(1000, p, h) for p, h in [(True, 2.0), (True, 2.2), (True, 2.4), (False, 5.0), (False, 5.5),
                                                (False, 6.0)]]
    _, numbers = hs.grid_findings(rows, [1000], 4096)
    pooled, at_1000 = numbers["comparisons"]
    assert at_1000["claim"].startswith("At 1000 tokens") and at_1000["a"]["low"] > at_1000["b"]["high"]


def test_grid_findings_of_passkey_trials_and_of_a_grid_that_never_passes():
    cell = {"length": 1000, "depth": 50, "keys": [11111, 22222], "found": [11111, 3], "entropy_trials": [2.0, 4.0],
            "trials": 2, "passed": 1, "pass_rate": 0.5, "entropy": 3.0}
    lines, numbers = hs.grid_findings([cell, {**cell, "depth": 90}], [1000], 4096)
    assert lines[0] == "2/4 trials pass over 1 length: pass rate 0.50 [0.15, 0.85] (n=4)."
    assert len(lines) == 3  # no training-length split: every length is inside it
    assert lines[1] == ("1000 tokens: 2/4 trials pass, 0.50 [0.15, 0.85] (n=4); mean attention entropy 3.00 nats "
                        "(n=2 cells); failing 4.00 (n=2); passing 2.00 (n=2).")
    assert lines[2].endswith("2.00 (n=2) over the passing ones: higher for the failing ones; per length, the same "
                             "at every length that holds both.")
    assert [c["claim"][:8] for c in numbers["comparisons"]] == ["Over eve"]
    lines, _ = hs.grid_findings([{**cell, "found": [0, 0]}], [1000], 4096)
    assert lines[0].startswith("0/2 trials pass") and lines[2] == (
        "Mean attention entropy 3.00 nats over all 2 trials, every one of which failed: no passing / failing "
        "comparison.")


def test_cells_carry_their_interval_from_three_trials_on():
    cell = {"keys": [1, 2, 3, 4, 5], "found": [1, 2, 3, 0, 0], "entropy_trials": [1.0, 2.0, 3.0, 4.0, 5.0]}
    fields = hs.cell_intervals(cell)
    assert (fields["pass_rate"], fields["pass_rate_n"]) == (0.6, 5)
    assert fields["pass_rate_low"] == pytest.approx(0.2307, abs=1e-4)   # Wilson of 3/5
    assert fields["pass_rate_high"] == pytest.approx(0.8824, abs=1e-4)
    assert fields["entropy_se"] == pytest.approx(math.sqrt(2.5 / 5)) and fields["entropy_n"] == 5
    two = hs.cell_intervals({"keys": [1, 2], "found": [1, 0], "entropy_trials": [1.0, 2.0]})
    assert (two["pass_rate_low"], two["pass_rate_high"], two["entropy_se"], two["pass_rate_n"]) == (None, None,
                                                                                                   None, 2)
    needle = hs.cell_intervals(needle_row(1000, True, 2.0))               # a needle cell is one trial
    assert (needle["pass_rate"], needle["pass_rate_low"], needle["entropy_se"], needle["entropy_n"]) == (1.0, None,
                                                                                                        None, 1)


# ---------------------------------------------------------------------------------------------------------------
# Trained length, heatmaps
# ---------------------------------------------------------------------------------------------------------------

def test_boundary_x():
    lengths = [1000, 2000, 4000, 8192, 10000]
    assert hs.boundary_x(lengths, 8192) == 3.5  # between the 8192 column and the 10000 one, not inside 10000
    assert hs.boundary_x(lengths, 9000) == 3.5
    assert hs.boundary_x(lengths, 1999) == 0.5
    assert hs.boundary_x(lengths, 999) is None and hs.boundary_x(lengths, 10000) is None


def cells(lengths, depths, rate, trials=1):
    return [{"length": n, "depth": d, "pass_rate": rate(n, d), "trials": trials, "entropy": 2.5}
            for n in lengths for d in depths]


@pytest.mark.parametrize("trials", [1, 5])
def test_heatmap_panels_each_dash_their_own_training_length(monkeypatch, tmp_path, trials):
    figures = []
    monkeypatch.setattr(hs, "save_figure", lambda fig, path: figures.append(fig))
    lengths, depths = [1000, 2000, 4000, 8192, 10000], [0, 50, 100]
    rows = cells(lengths, depths, lambda n, d: float(n <= 4000) if trials == 1 else (n < 8000) * 0.6, trials)
    panels = [("4K model", rows, 4096), ("32K model", rows, 32768), ("8K model", rows[:6], 8192)]
    hs.draw_heatmaps(panels, lengths, depths, tmp_path / "h.png")
    (fig,) = figures
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    grids, strips = axes[:3], axes[3:]                 # a heatmap per panel, a strip under each
    for row in (grids, strips):
        dashed = [[line.get_xdata() for line in ax.get_lines() if line.get_linestyle() == "--"] for ax in row]
        assert [[list(x) for x in d] for d in dashed] == [[[2.5, 2.5]], [], [[3.5, 3.5]]]
    titles = [ax.get_title() for ax in grids]
    assert titles[0].startswith("4K model\ntraining length 4096,\n")
    assert titles[1].startswith("32K model\ntraining length 32768 (no column above it),\n")
    assert titles[2].startswith("8K model\ntraining length 8192,\n")
    # the panel's pooled rate with its Wilson interval: 9 of 15 cells, or 9 cells x 3/5 trials = 27 of 75
    passed, n, unit = (9, 15, "cells") if trials == 1 else (27, 75, "trials")
    assert titles[0].endswith(f"{passed}/{n} {unit} pass, {wilson(passed, n).text()}")
    assert "nats" in fig._suptitle.get_text() and "Wilson 95 % interval" in fig._suptitle.get_text()
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    if trials == 1:
        assert labels == ["pass", "fail", "not run", "training length"]
    else:
        assert labels == ["not run", "training length"]
        assert any(ax.get_label() == "<colorbar>" and ax.get_ylabel() == "pass rate" for ax in fig.axes)
        assert "3/5\n2.50" in [t.get_text() for t in grids[0].texts]
    # not-run cells of the third panel are masked (grey), run ones carry their rate
    image = grids[2].get_images()[0].get_array()
    assert image.mask.sum() == len(rows) - 6 and not image.mask[:, :2].any()
    # the strip: per length, k/n over depths and trials, and the Wilson interval as a vertical bar at its column
    k = {1000: 3, 2000: 3, 4000: 3, 8192: 0, 10000: 0} if trials == 1 else {1000: 9, 2000: 9, 4000: 9, 8192: 0,
                                                                           10000: 0}
    per_length = 3 * trials
    assert [t.get_text() for t in strips[0].texts] == [f"{k[m]}/{per_length}" for m in lengths]
    bars = [segment for c in strips[0].collections for segment in c.get_segments()]
    expected = [wilson(k[m], per_length) for m in lengths]
    np.testing.assert_allclose([[x0, y0, x1, y1] for (x0, y0), (x1, y1) in bars],
                               [[j, i.low, j, i.high] for j, i in enumerate(expected)], rtol=1e-12)
    assert [t.get_text() for t in strips[2].texts] == [f"{k[1000]}/{per_length}", f"{k[2000]}/{per_length}"]


def test_a_length_with_fewer_than_three_trials_has_no_bar(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(hs, "save_figure", lambda fig, path: figures.append(fig))
    hs.draw_heatmaps([("m", cells([1000, 2000], [50], lambda n, d: 1.0), 8192)], [1000, 2000], [50], tmp_path / "h")
    strip = figures[0].axes[1]
    assert [t.get_text() for t in strip.texts] == ["1/1", "1/1"]
    assert [segment for c in strip.collections for segment in c.get_segments()] == []


def test_legend_names_only_what_is_drawn(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(hs, "save_figure", lambda fig, path: figures.append(fig))
    hs.draw_heatmaps([("m", cells([1000, 2000], [50], lambda n, d: 1.0), 8192)], [1000, 2000], [50], tmp_path / "h")
    assert [t.get_text() for legend in figures[0].legends for t in legend.get_texts()] == ["pass", "fail"]
    figures.clear()
    hs.draw_heatmaps([("m", cells([1000, 2000], [50], lambda n, d: 0.5, trials=2), 8192)], [1000, 2000], [50],
                     tmp_path / "h")
    assert figures[0].legends == [] and "pass rate" in [ax.get_ylabel() for ax in figures[0].axes]
