"""One small tokenizer interface over the two formats LLaMa models ship, and UTF-8 bytes for new models.

- `tokenizer.json` (Hugging Face `tokenizers`; Llama-3, SmolLM, and what `ropelite.gguf` writes). Preferred when
  present, as Hugging Face's AutoTokenizer does.
- `tokenizer.model` (sentencepiece; LLaMa-2 family).

`tokenizer_config.json`, when present, says whether a BOS token is prepended, names BOS/EOS and holds the chat
template. BOS is always added by this class (never by a backend), so `encode(text, add_bos=...)` is exact.

`ByteTokenizer` needs no vocabulary: ids 0..255 are the UTF-8 bytes, 256 is EOS (`train.py --init random`). Its
models carry only a `tokenizer_config.json` naming it ({"tokenizer_class": "ByteTokenizer", ...}), which
`load_tokenizer` reads back (transformers has no such class: ByT5's bytes are offset by 3 special ids).
"""

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
import sentencepiece
import tokenizers

from ropelite.errors import RopeliteError


class Tokenizer:
    def __init__(self, backend, *, bos_id=None, eos_id=None, add_bos=False, chat_template=None,
                 bos_token=None, eos_token=None):
        self.backend = backend  # tokenizers.Tokenizer or sentencepiece.SentencePieceProcessor
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token

    @property
    def vocab_size(self) -> int:
        if isinstance(self.backend, sentencepiece.SentencePieceProcessor):
            return self.backend.get_piece_size()
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; add_bos=None prepends BOS exactly when the model's files say so."""
        if isinstance(self.backend, sentencepiece.SentencePieceProcessor):
            ids = self.backend.encode(text)
        else:
            # special tokens written in the text (<|im_start|>) are still matched whole
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos:
            if self.bos_id is None:
                raise RopeliteError("add_bos requested but this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens (BOS, EOS, <|im_end|>) left out, as sentencepiece does."""
        ids = [int(i) for i in ids]
        if isinstance(self.backend, sentencepiece.SentencePieceProcessor):
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=True)

    def chat(self, user: str, assistant_prefix: str = "") -> str:
        """Prompt text for one user turn, ending where the assistant's answer starts (+ assistant_prefix).

        Without a chat template (base models) it is just the user text, a newline and the prefix.
        """
        if self.chat_template is None:
            return f"{user}\n{assistant_prefix}"
        # Hugging Face renders templates in a sandbox with these whitespace options; templates rely on them.
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        prompt = env.from_string(self.chat_template).render(
            messages=[{"role": "user", "content": user}],
            add_generation_prompt=True,
            # encode() prepends BOS itself when the model wants one; a template's {{ bos_token }} would double it
            bos_token="" if self.add_bos else (self.bos_token or ""),
            eos_token=self.eos_token or "",
        )
        return prompt + assistant_prefix


class ByteTokenizer:
    """Token ids 0..255 are the UTF-8 bytes of the text, 256 is EOS: text data for ``--init random``."""

    vocab_size = 257
    eos_id = 256
    bos_id = None
    add_bos = False

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    chat_template = None
    chat = Tokenizer.chat  # without a template: the user text, a newline and the prefix

    @classmethod
    def config(cls) -> dict:
        """The tokenizer_config.json that names this tokenizer in a model folder."""
        return {"tokenizer_class": cls.__name__, "vocab_size": cls.vocab_size, "eos_token_id": cls.eos_id,
                "add_bos_token": False, "ropelite": "ids 0..255 are the UTF-8 bytes of the text, 256 is EOS"}


def _raise_template_error(message):
    raise RopeliteError(f"chat template: {message}")


def _token_text(value):
    """tokenizer_config.json writes special tokens either as text or as {"content": text, ...}."""
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(model_dir) -> Tokenizer | ByteTokenizer | None:
    """The tokenizer of a model directory, or None when it has neither tokenizer.json nor tokenizer.model nor a
    tokenizer_config.json naming ByteTokenizer."""
    model_dir = Path(model_dir)
    cfg = _read_json(model_dir / "tokenizer_config.json")
    model_cfg = _read_json(model_dir / "config.json")
    if cfg.get("tokenizer_class") == ByteTokenizer.__name__:
        return _byte_tokenizer(model_dir, cfg)
    bos_token, eos_token = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))

    if (model_dir / "tokenizer.json").is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise RopeliteError(f"cannot read {model_dir / 'tokenizer.json'}: {e}") from e
        bos_id = backend.token_to_id(bos_token) if bos_token else None
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        if "add_bos_token" in cfg:
            add_bos = cfg["add_bos_token"]
        else:
            # Llama-3's files carry no add_bos_token: its tokenizer.json post-processor prepends BOS instead
            bos_id = bos_id if bos_id is not None else first_id(model_cfg.get("bos_token_id"))
            add_bos = bos_id is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    elif (model_dir / "tokenizer.model").is_file():
        try:
            backend = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        except Exception as e:
            raise RopeliteError(f"cannot read {model_dir / 'tokenizer.model'} as sentencepiece: {e}") from e
        bos_id = backend.bos_id() if backend.bos_id() >= 0 else None  # -1 = model has no BOS
        eos_id = backend.eos_id() if backend.eos_id() >= 0 else None
        bos_token = bos_token or (backend.id_to_piece(bos_id) if bos_id is not None else None)
        eos_token = eos_token or (backend.id_to_piece(eos_id) if eos_id is not None else None)
        add_bos = cfg.get("add_bos_token", True)  # LLaMa-2's (and HF LlamaTokenizer's) default
    else:
        return None

    if bos_id is None:
        bos_id = first_id(model_cfg.get("bos_token_id"))
    if eos_id is None:
        eos_id = first_id(model_cfg.get("eos_token_id"))
    chat_template = cfg.get("chat_template")
    if isinstance(chat_template, list):  # several named templates: the "default" one is the chat one
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    if chat_template is None and (model_dir / "chat_template.jinja").is_file():  # newer HF layout
        chat_template = (model_dir / "chat_template.jinja").read_text()
    return Tokenizer(backend, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, chat_template=chat_template,
                     bos_token=bos_token, eos_token=eos_token)


def _byte_tokenizer(model_dir: Path, cfg: dict) -> ByteTokenizer:
    """A folder's ByteTokenizer, its config checked key by key against the class's (ids cannot be remapped)."""
    for key, value in ByteTokenizer.config().items():
        if key != "ropelite" and cfg.get(key) != value:
            raise RopeliteError(f"{model_dir / 'tokenizer_config.json'}: ByteTokenizer with {key} = "
                                f"{cfg.get(key)!r}, but ropelite's has {value!r}")
    return ByteTokenizer()


def first_id(value):
    """config.json may list several EOS ids (Llama-3.1); the first is the canonical one."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RopeliteError(f"{path} is not valid JSON: {e}") from e
