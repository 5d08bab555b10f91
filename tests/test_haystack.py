"""ropelite.haystack: scoring (needle recall, the passkey's first integer), the keys, the sample rule for the
haystack, sentence boundaries, needle and pass-key placement (depth 0 included), the prompt with and without the
chat template, the trained length, and the heatmap's dashed line per panel.

The tokenizer is byte-level (one token per ASCII character), so token indices are character indices and
placements can be checked on the text itself.
"""

import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ropelite import haystack as hs
from ropelite.data import load_documents
from ropelite.errors import RopeliteError
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
    return hs.build_haystack(functools.partial(hs.filler_ids, tokenizer), tokenizer, lengths, hs.PASSKEY_TEMPLATE,
                             hs.PASSKEY_QUESTION, hs.PASSKEY_PREFIX, hs.PASSKEY_LINE.format(key=10000), max_new,
                             chat)


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
    dashed = [[line.get_xdata() for line in ax.get_lines() if line.get_linestyle() == "--"] for ax in axes]
    assert [[list(x) for x in d] for d in dashed] == [[[2.5, 2.5]], [], [[3.5, 3.5]]]
    titles = [ax.get_title() for ax in axes]
    assert titles[0].startswith("4K model\ntraining length 4096, ")
    assert titles[1].startswith("32K model\ntraining length 32768 (no column above it), ")
    assert titles[2].startswith("8K model\ntraining length 8192, ")
    assert titles[0].endswith("9/15 pass" if trials == 1 else "mean pass rate 0.36")
    assert "nats" in fig._suptitle.get_text()
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    if trials == 1:
        assert labels == ["pass", "fail", "not run", "training length"]
    else:
        assert labels == ["not run", "training length"]
        assert any(ax.get_label() == "<colorbar>" and ax.get_ylabel() == "pass rate" for ax in fig.axes)
        assert "3/5\n2.50" in [t.get_text() for t in axes[0].texts]
    # not-run cells of the third panel are masked (grey), run ones carry their rate
    image = axes[2].get_images()[0].get_array()
    assert image.mask.sum() == len(rows) - 6 and not image.mask[:, :2].any()


def test_legend_names_only_what_is_drawn(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(hs, "save_figure", lambda fig, path: figures.append(fig))
    hs.draw_heatmaps([("m", cells([1000, 2000], [50], lambda n, d: 1.0), 8192)], [1000, 2000], [50], tmp_path / "h")
    assert [t.get_text() for legend in figures[0].legends for t in legend.get_texts()] == ["pass", "fail"]
    figures.clear()
    hs.draw_heatmaps([("m", cells([1000, 2000], [50], lambda n, d: 0.5, trials=2), 8192)], [1000, 2000], [50],
                     tmp_path / "h")
    assert figures[0].legends == [] and "pass rate" in [ax.get_ylabel() for ax in figures[0].axes]
