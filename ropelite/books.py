"""The built-in `books` corpus: four public-domain books that PyPI already carries, fetched once with pip.

- "botchan": Natsume Soseki's *Botchan* (tr. Yasotaro Morri, 1919), `test/botchan.txt` of the
  sentencepiece 0.2.3 sdist;
- "alice29", "asyoulik", "lcet10": Carroll's *Alice's Adventures in Wonderland*, Shakespeare's *As You Like
  It* and the Library of Congress *Workshop on Electronic Texts* proceedings (1992), the three long English
  texts of the Canterbury corpus, `tests/testdata/` of the brotli 1.2.1 sdist.

Each sdist is downloaded once with `pip download` into `$ROPELITE_CACHE/books` and refused unless its sha256
is the pinned one; only the four text members are read from it (by exact name, into memory: nothing the
archive names is ever written to disk). Each book is stripped of its Project Gutenberg header, licence and
credits (`strip_gutenberg`) and cached as one UTF-8 document with "\\n" line ends, itself pinned by sha256, so
later calls read the cache and touch no network. The documents always come in the order of `BOOKS`.

The sample rule that cuts N sequences of L tokens from such documents (`sample_windows`) is at the end.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ropelite.errors import RopeliteError
from ropelite.hub import cache_dir, pip_fetch
from ropelite.io import atomic_path

CORPUS = "books"  # the name result files give this corpus


@dataclass(frozen=True)
class Sdist:
    """A source archive on PyPI, pinned by the sha256 of the file pip downloads."""

    package: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Book:
    name: str          # the document's name in result files
    sdist: Sdist
    member: str        # its path inside the archive
    text_sha256: str   # of the stripped text, UTF-8: pins what every result measured on
    ends_with: str = ""  # the book's last words, when a transcriber's note follows them


SENTENCEPIECE = Sdist("sentencepiece", "0.2.3", "sentencepiece-0.2.3.tar.gz",
                      "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd")
BROTLI = Sdist("brotli", "1.2.1", "brotli-1.2.1.tar.gz",
               "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de")
BOOKS = (
    # after the end: the transcriber's list of the misprints kept in the text (marked [A] to [R] there)
    Book("botchan", SENTENCEPIECE, "sentencepiece-0.2.3/test/botchan.txt",
         "97b3337dfa87bf293725bceb5104ff2f8faf6ad1bc5ba5112f24ae3d95b172ef", ends_with="--(THE END)--"),
    Book("alice29", BROTLI, "brotli-1.2.1/tests/testdata/alice29.txt",
         "39cdc602a59b850142b6929b3798ad8a678eb33a5c97acea8c12e0d74b765da3"),
    Book("asyoulik", BROTLI, "brotli-1.2.1/tests/testdata/asyoulik.txt",
         "9f37fa67305e7d086a8a2d9f394a638543a21ebd6e6b0fc7eaf39f9b78aa729b"),
    # after the closing rule: the note on how the proceedings were edited into an e-text
    Book("lcet10", BROTLI, "brotli-1.2.1/tests/testdata/lcet10.txt",
         "9da76db80e172cd695b98faf61bedc1132c67a80752f8c18362bb770805e08d4", ends_with="*" * 61),
)


def document_names(books: tuple[Book, ...] = BOOKS) -> list[str]:
    """The names of the documents `load_books` returns, in its order (no download)."""
    return [book.name for book in books]


def load_books(books: tuple[Book, ...] = BOOKS) -> list[str]:
    """The stripped texts of `books`, in that order."""
    return [text for _, text in documents(books)]


def documents(books: tuple[Book, ...] = BOOKS) -> list[tuple[str, str]]:
    """(name, stripped text) of each book, from the cache; the first call downloads and extracts them."""
    folder = cache_dir() / CORPUS
    out = []
    for book in books:
        path = folder / f"{book.name}.txt"
        data = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(data).hexdigest() != book.text_sha256:
            data = _build(book, folder, path)
        out.append((book.name, data.decode("utf-8")))
    return out


def _build(book: Book, folder: Path, path: Path) -> bytes:
    """The stripped text of `book` as UTF-8, from its verified archive, written to `path` for next time."""
    archive = fetch_sdist(book.sdist, folder)
    raw = read_member(archive, book.member)
    try:
        text = strip_gutenberg(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise RopeliteError(f"{book.member} in {archive.name} is not UTF-8 text") from e
    if book.ends_with:
        text = text[:text.rindex(book.ends_with) + len(book.ends_with)]
    data = text.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    if digest != book.text_sha256:
        # the archive is verified, so only a changed strip_gutenberg gets here: the pin must change with it
        raise RopeliteError(f"book {book.name} strips to sha256 {digest}, expected {book.text_sha256}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return data


def fetch_sdist(sdist: Sdist, folder: Path) -> Path:
    """The verified archive in `folder`, downloaded with pip when no verified copy is there yet.

    pip has no download-only mode for an sdist (pypa/pip#1884): it also prepares the package's metadata in an
    isolated build environment. `--no-binary PACKAGE` (not `:all:`) lets that environment install its build
    tools (setuptools, ...) as wheels: 3 s for sentencepiece, against 35 s when `:all:` builds them from source.
    """
    return pip_fetch(sdist.requirement, sdist.filename, sdist.sha256, folder, ["--no-binary", sdist.package],
                     what="source archive",
                     instead="the built-in books need it: give your own text with --data FILE instead")


def read_member(archive: Path, member: str) -> bytes:
    """The bytes of the regular file named exactly `member` in a .tar.gz or .zip archive.

    Read into memory, never extracted: a hostile name ("../x", "/etc/x") or a link cannot write anywhere.
    """
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                info = zf.getinfo(member)
                if info.is_dir():
                    raise KeyError(member)
                return zf.read(info)
        with tarfile.open(archive, "r:*") as tf:
            info = tf.getmember(member)
            if not info.isfile():  # a symlink or device under the right name is not the book
                raise KeyError(member)
            return tf.extractfile(info).read()
    except KeyError:
        raise RopeliteError(f"{archive.name} has no file {member}") from None
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise RopeliteError(f"cannot read {archive}: {e}") from None


# Project Gutenberg frames a book with a header (title, licence summary, then a START marker) and a footer
# ("End of Project Gutenberg's ...", an END marker, then the full licence). Old e-texts close the header with
# "*END*THE SMALL PRINT!" or name the e-text in their first line instead.
_START = re.compile(r"^\W*(start of (the|this) project gutenberg|end\*the small print)[^\n]*\n?", re.I | re.M)
_END = re.compile(r"^\W*end of (the |this )?project gutenberg", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """The book inside a Project Gutenberg e-text: header, producer credits, footer and licence removed,
    line ends made "\\n", blank lines before and blank space after it trimmed (the first line keeps its
    indent). Text without Gutenberg framing only gets the last two.
    """
    # a byte-order mark before, a DOS end-of-file mark (Ctrl-Z) after: neither is text
    text = text.lstrip("\ufeff").rstrip("\x1a").replace("\r\n", "\n").replace("\r", "\n")
    start = _START.search(text)
    begin = start.end() if start else 0
    end = _END.search(text, begin)
    lines = _from_first_words(text[begin:end.start() if end else None].split("\n"))
    if not start and lines and "project gutenberg" in lines[0].lower():
        lines = _from_first_words(lines[1:])  # an old e-text's title line
    if lines and lines[0].lstrip().lower().startswith("produced by"):
        # the credit paragraph ends at a blank line; a book set without blank lines loses the credit line only
        blank = next((i for i, line in enumerate(lines[1:4], start=1) if not line.strip()), 1)
        lines = _from_first_words(lines[blank:])
    return "\n".join(lines).rstrip()


def _from_first_words(lines: list[str]) -> list[str]:
    return list(itertools.dropwhile(lambda line: not line.strip(), lines))
