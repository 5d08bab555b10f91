"""Documents: built-in text, every --data format, tokenisation, errors."""

import json

import numpy as np
import pytest
from pydoc_data.topics import topics

from ropelite.data import builtin_documents, load_documents, tokenize_checked, tokenize_documents
from ropelite.errors import RopeliteError


class CharTokenizer:
    """Stands in for a model tokenizer: one id per character (< 256), BOS = 256."""

    vocab_size = 257

    def encode(self, text):
        return [256] + [min(ord(c), 255) for c in text]


def test_builtin_prose_is_the_pydoc_topics_in_sorted_order():
    docs = builtin_documents("prose")
    assert docs == [topics[name] for name in sorted(topics)]
    assert builtin_documents("prose") == docs  # deterministic


def test_builtin_code_and_mixed():
    code = builtin_documents("code")
    assert len(code) > 50 and all(isinstance(d, str) for d in code)
    assert any("def " in d for d in code[:5])
    prose = builtin_documents("prose")
    mixed = builtin_documents("mixed")
    assert mixed[:4] == [prose[0], code[0], prose[1], code[1]]
    assert sorted(mixed) == sorted(prose + code)


def test_min_chars_groups_consecutive_documents():
    prose = builtin_documents("prose")
    long = builtin_documents("prose", min_chars=50_000)
    assert all(len(d) >= 50_000 for d in long)
    assert long[0].startswith(prose[0]) and prose[1] in long[0]
    # nothing reordered or lost but a tail shorter than min_chars: groups are consecutive topics + blank lines
    everything, kept = "\n\n".join(prose), "\n\n".join(long)
    assert everything.startswith(kept) and len(everything) - len(kept) < 50_000
    with pytest.raises(RopeliteError, match="shorter than min_chars"):
        builtin_documents("prose", min_chars=10**9)
    with pytest.raises(RopeliteError, match="unknown built-in data kind"):
        builtin_documents("poetry")


def test_no_data_means_builtin():
    assert load_documents(None, kind="code") == builtin_documents("code")
    assert load_documents([], kind="prose", min_chars=100_000) == builtin_documents("prose", min_chars=100_000)


def test_text_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.md").write_text("# second")
    (tmp_path / "corpus" / "sub" / "c.py").write_text("print('third')")
    (tmp_path / "corpus" / "image.png").write_bytes(b"\x89PNG")  # not a data suffix: skipped
    (tmp_path / "corpus" / ".hidden.txt").write_text("skipped")
    (tmp_path / "corpus" / "empty.txt").write_text("  \n")  # empty documents are dropped
    docs = load_documents([str(tmp_path / "a.txt"), str(tmp_path / "corpus")])
    assert docs == ["first document", "# second", "print('third')"]


def test_jsonl(tmp_path):
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two\nlines"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    assert load_documents([str(tmp_path / "d.jsonl")]) == ["one", "two\nlines"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(RopeliteError, match=r"bad.jsonl:2: no \"text\""):
        load_documents([str(tmp_path / "bad.jsonl")])
    (tmp_path / "broken.jsonl").write_text("{oops\n")
    with pytest.raises(RopeliteError, match="broken.jsonl:1: not JSON"):
        load_documents([str(tmp_path / "broken.jsonl")])


def test_token_arrays(tmp_path):
    np.save(tmp_path / "one.npy", np.array([5, 6, 7], dtype=np.int32))
    np.save(tmp_path / "rows.npy", np.array([[1, 2], [3, 4]], dtype=np.uint16))
    np.array([9, 60000, 11], dtype=np.uint16).tofile(tmp_path / "stream.bin")
    docs = load_documents([str(tmp_path / "one.npy"), str(tmp_path / "rows.npy"), str(tmp_path / "stream.bin")])
    assert [d.tolist() for d in docs] == [[5, 6, 7], [1, 2], [3, 4], [9, 60000, 11]]
    np.save(tmp_path / "floats.npy", np.ones(3))
    with pytest.raises(RopeliteError, match="integer token array"):
        load_documents([str(tmp_path / "floats.npy")])
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(RopeliteError, match="odd size"):
        load_documents([str(tmp_path / "odd.bin")])


def test_tokenize_documents_encodes_text_and_passes_arrays_through():
    docs = ["ab", np.array([3, 4], dtype=np.uint16)]
    ids = tokenize_documents(docs, CharTokenizer())
    assert [i.dtype for i in ids] == [np.int64, np.int64]
    assert [i.tolist() for i in ids] == [[256, 97, 98], [3, 4]]  # no BOS forced onto pre-tokenised input
    assert tokenize_documents([np.array([1, 2])], None)[0].tolist() == [1, 2]
    with pytest.raises(RopeliteError, match="need a tokenizer"):
        tokenize_documents(["text"], None)
    with pytest.raises(RopeliteError, match="token id 300 outside"):
        tokenize_documents([np.array([1, 300])], CharTokenizer())


def test_tokenize_checked_stops_at_need_appends_eos_and_names_the_bad_id():
    docs = [np.array([1, 2, 3]), "ab", np.array([4])]
    assert [i.tolist() for i in tokenize_checked(docs, CharTokenizer(), 257)] == [[1, 2, 3], [256, 97, 98], [4]]
    # need counts every id, EOS included: 4 after the first document, 8 after the second
    parts = tokenize_checked(docs, CharTokenizer(), 257, need=5, eos_id=0)
    assert [i.tolist() for i in parts] == [[1, 2, 3, 0], [256, 97, 98, 0]]
    assert len(tokenize_checked(docs, CharTokenizer(), 257, need=4, eos_id=0)) == 1
    with pytest.raises(RopeliteError, match=r"^token id 256 outside the model's vocabulary \(100 ids\)$"):
        tokenize_checked(docs, CharTokenizer(), 100)   # the BOS of the text document
    with pytest.raises(RopeliteError, match=r"^token id -1 outside the model's vocabulary \(257 ids\)$"):
        tokenize_checked([np.array([5, -1])], None, 257)
    # documents after `need` are not tokenised, so not checked either
    assert len(tokenize_checked([np.array([1, 2]), np.array([999])], None, 257, need=2)) == 1


def test_errors(tmp_path):
    with pytest.raises(RopeliteError, match="data not found"):
        load_documents([str(tmp_path / "missing.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RopeliteError, match="no .* files in"):
        load_documents([str(tmp_path / "empty")])
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(RopeliteError, match="no non-empty documents"):
        load_documents([str(tmp_path / "blank.txt")])
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(RopeliteError, match="not UTF-8"):
        load_documents([str(tmp_path / "latin1.txt")])
