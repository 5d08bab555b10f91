"""Every command in README.md's shell code blocks and in each script's usage docstring runs as written, at the
level a CPU test affords (the level is in each test's id):

- run: as written, in a scratch folder: the CPU-sized ones (train.py --init random up to 64Ki tokens,
  ablation.py --dry-run);
- plan: train.py --dry-run, which resolves the flags, the model's config and RoPE, the budget, the data and the
  held-out set and builds the optimizer on shapes only, reading no weight; a torchrun command plans for its
  --nproc_per_node processes (WORLD_SIZE);
- parse: the script's own argparse takes every flag and value (types, choices, counts): the commands that need a
  GPU, a pretrained model for minutes to hours, or a run to continue (train.py --resume).

Placeholders stand for the user's files: path/to/<model> is a LLaMa-2-7B config.json with ropelite's byte
tokenizer and no weights (a plan reads none), my-corpus/ and corpus/ a folder of two short texts, book.txt one;
a plan over a placeholder corpus passes --epochs-ok, since whether the budget fits is for the user's corpus to say.
"""

import ast
import importlib.util
import inspect
import re
import shlex
import sys
from pathlib import Path

import pytest

from ropelite.cli import ArgumentParser
from ropelite.hf import config_to_hf
from ropelite.io import write_json
from ropelite.model import LlamaConfig
from ropelite.rope import RopeConfig
from ropelite.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]
                 if re.search(r"^def main\(", p.read_text(), re.M))
SHELLS = ("", "bash", "sh", "shell", "console")  # the info strings of a shell code block
COMMAND = re.compile(r"(?:^|&&)\s*(?:[A-Z_]+=\S*\s+)*(?:python|torchrun)\s+(?:-\S|[\w./-]+\.py(?:\s|$))")
RUN_TOKENS = 32768          # train.py --init random runs up to this budget run for real (~15 s)
CORPORA = {"my-corpus/", "corpus/", "book.txt"}


def shell_blocks(markdown: str) -> list[tuple[int, str]]:
    """(number of its first line, text) of each shell code block of ``markdown``."""
    blocks, info, first, body = [], None, 0, []
    for number, line in enumerate(markdown.splitlines(), start=1):
        if not line.startswith("```"):
            body.append(line)
        elif info is None:
            info, first, body = line[3:].strip(), number + 1, []
        else:
            if info in SHELLS:
                blocks.append((first, "\n".join(body)))
            info = None
    return blocks


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of ``text``, a backslash-continued line joined to the next."""
    lines, joined = [], ""
    for number, line in enumerate(text.splitlines(), start=1):
        joined = f"{joined} {line.strip()}" if joined else line.strip()
        if joined.endswith("\\"):
            joined = joined[:-1]
            continue
        lines.append((number, joined))
        joined = ""
    return lines


def script_command(line: str) -> tuple[str, list[str], int] | None:
    """(script, its arguments, processes) of a line that runs one of ours (``python X.py ...``, ``torchrun
    --nproc_per_node N X.py ...``, after any ``a && b`` or ``VAR=value``), else None (prose, comments, pip,
    python -m)."""
    if not COMMAND.search(line):
        return None
    words = shlex.split(line.rsplit("&&", 1)[-1], comments=True)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if len(words) < 2 or words[0] not in ("python", "torchrun") or words[1] == "-m":
        return None
    processes = 1
    if words[0] == "torchrun":  # its own options, up to the script: --standalone, --opt value, --opt=value
        while len(words) > 1 and words[1].startswith("--"):
            option, _, given = words[1].partition("=")
            taken = 1 if given or option == "--standalone" else 2
            if option in ("--nproc_per_node", "--nproc-per-node"):
                processes = int(given or words[2])
            words = words[:1] + words[1 + taken:]
    return (words[1], words[2:], processes) if len(words) > 1 and words[1].endswith(".py") else None


def commands() -> list[tuple[str, str, list[str], int]]:
    """(where, script, arguments, processes) of every command of README.md's shell blocks and the usage docstrings."""
    found = []
    for first, block in shell_blocks((ROOT / "README.md").read_text()):
        found += [(f"README.md:{first + n - 1}", *cmd) for n, line in shell_lines(block)
                  if (cmd := script_command(line))]
    for script in SCRIPTS:
        usage = ast.get_docstring(ast.parse((ROOT / script).read_text())) or ""
        found += [(f"{script} usage", *cmd) for _, line in shell_lines(usage) if (cmd := script_command(line))]
    return found


def value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def level(script: str, argv: list[str], processes: int) -> str:
    """run, plan or parse (module docstring)."""
    if {"--help", "-h"} & set(argv):
        return "parse"
    if script == "train.py":
        if "--resume" in argv:
            return "parse"
        tokens = value(argv, "--tokens")
        small = tokens is not None and load_script("train.py").token_count(tokens) <= RUN_TOKENS
        return "run" if value(argv, "--init") == "random" and small and processes == 1 else "plan"
    return "run" if script == "ablation.py" and "--dry-run" in argv else "parse"


def load_script(script: str):
    """A script as a module (its ``main`` not run): ROOT/script under its own name, with its folder on sys.path
    as ``python script`` puts it there (a benchmark imports its neighbours)."""
    name = "script_" + re.sub(r"\W", "_", script)
    if name not in sys.modules:
        if str((ROOT / script).parent) not in sys.path:
            sys.path.insert(0, str((ROOT / script).parent))
        spec = importlib.util.spec_from_file_location(name, ROOT / script)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def cases() -> list:
    return list(_cases())


def _cases():
    for where, script, argv, processes in commands():
        how = level(script, argv, processes)
        pretrained = (script == "train.py" and how == "plan" and value(argv, "--init") != "random"
                      and value(argv, "--model") in (None, "smollm2"))
        shown = ("torchrun -n %d " % processes if processes > 1 else "python ") + " ".join([script, *argv])
        yield pytest.param(script, argv, processes, how, id=f"{how}: {where}: {shown}",
                           marks=[pytest.mark.smollm2] if pretrained else [])


class Parsed(Exception):
    def __init__(self, args):
        super().__init__()
        self.namespace = args


def parse(script: str, argv: list[str], monkeypatch):
    """The namespace the script's main() parses from ``argv``; main() is stopped right there."""
    module = load_script(script)
    real = ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(ArgumentParser, "parse_args", stop)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        module.main(argv) if inspect.signature(module.main).parameters else module.main()
    except Parsed as parsed:
        return parsed.namespace
    except SystemExit as done:  # --help, --version
        assert done.code == 0, f"{script} exited with {done.code}"
        return None
    raise AssertionError(f"{script}'s main() returned without parsing its flags")


@pytest.fixture
def placeholders(tmp_path_factory):
    """{placeholder: stand-in path} (module docstring)."""
    root = tmp_path_factory.mktemp("placeholders")
    llama = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, head_dim=128, eos_token_id=2,
                        rope=RopeConfig(theta=1e4, original_max_position_embeddings=4096))
    write_json(root / "llama-2-7b" / "config.json", config_to_hf(llama))
    write_json(root / "llama-2-7b" / "tokenizer_config.json", ByteTokenizer.config())
    (root / "corpus").mkdir()
    text = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 40
    for name in ("a.txt", "b.txt"):
        (root / "corpus" / name).write_text(text)
    (root / "book.txt").write_text(text)
    return {"model": root / "llama-2-7b", "my-corpus/": root / "corpus", "corpus/": root / "corpus",
            "book.txt": root / "book.txt"}


def test_every_script_and_the_readme_show_commands():
    """The parsing above finds what it is meant to check: commands in README.md and in each script's usage."""
    found = commands()
    assert sum(where.startswith("README.md") for where, *_ in found) >= 5
    assert {script for _, script, *_ in found} >= set(SCRIPTS)   # each script with a main() shows its usage
    assert all((ROOT / script).is_file() for _, script, *_ in found)


@pytest.mark.parametrize("script, argv, processes, how", cases())
def test_command_runs_as_written(script, argv, processes, how, placeholders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # whatever a command writes under runs/ lands here
    if how == "parse":
        parse(script, argv, monkeypatch)
        return
    module = load_script(script)
    if how == "run":
        module.main(argv)
        return
    stand_in = [str(placeholders["model"]) if a.startswith("path/to/") else str(placeholders.get(a, a)) for a in argv]
    epochs_ok = ["--epochs-ok"] if CORPORA & set(argv) else []
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    assert module.main(stand_in + epochs_ok + ["--dry-run"]) is None
