"""docs/tour.md is run like code: every Python block, in order, in a fresh process, and what each block prints is
compared with the ``output`` block under it.

The rule (the tour's introduction states it too): the printed text must match the output block exactly, line by
line (trailing spaces aside), except the numbers in it. A number printed as an integer (no decimal point, no
exponent) must be equal; any other number may differ by at most one unit of its last printed digit (0.0431
accepts 0.0430..0.0432; 1.14e+03 accepts 1.13e+03..1.15e+03), which absorbs rounding flips from float summation
order and thread counts, and nothing more. A Python block with no output block under it must print nothing.

Blocks whose first line is ``# needs SmolLM2`` load the real model (and the books); they run only in the test
marked ``smollm2``, which runs the whole tour in order as a reader would. The other test runs every other block,
so that part of the tour never depends on the model. Figures are written by the tour's code into
``docs/tour/`` under the working directory (a temporary one here) and checked to exist and be non-empty; the
committed ones are made the same way from the repository root:

    python tests/test_tour.py            # run the whole tour from the repository root: rewrites docs/tour/*.png,
                                         # prints each block's time and every output that no longer matches
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOUR = ROOT / "docs" / "tour.md"
SMOLLM2 = "# needs SmolLM2"
FENCE = re.compile(r"^```(\w*)\s*$")
FIGURE = re.compile(r"!\[[^\]]*\]\((tour/[^)\s]+\.png)\)")   # figure links, relative to docs/
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Block:
    line: int                 # 1-based line of the opening fence in the tour
    code: str
    expected: str | None      # the output block under it; None: it must print nothing
    smollm2: bool


def blocks(text: str) -> list[Block]:
    """The Python blocks of a tour in order, each with the ``output`` block that follows it (blank lines between
    allowed, nothing else)."""
    lines = text.splitlines()
    fenced, i = [], 0                          # (kind, opening line index, closing line index, body)
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"tour line {i + 1}: a ``` block that is never closed")
        fenced.append((opening.group(1), i, end, "\n".join(lines[i + 1:end])))
        i = end + 1
    found = []
    for k, (kind, at, end, body) in enumerate(fenced):
        if kind == "output" and (k == 0 or fenced[k - 1][0] != "python"):
            raise ValueError(f"tour line {at + 1}: an output block that follows no python block")
        if kind != "python":
            continue
        expected = None
        if k + 1 < len(fenced) and fenced[k + 1][0] == "output":
            if all(not line.strip() for line in lines[end + 1:fenced[k + 1][1]]):
                expected = fenced[k + 1][3]
        found.append(Block(at + 1, body, expected, body.startswith(SMOLLM2)))
    return found


# Runs in the fresh process: each block in one shared namespace, its stdout captured; stops at the first error.
RUNNER = r"""
import contextlib, io, json, sys, time, traceback
todo = json.load(open(sys.argv[1]))
namespace, results = {"__name__": "__main__"}, []
for block in todo:
    out, start, cpu = io.StringIO(), time.perf_counter(), time.process_time()
    error = None
    with contextlib.redirect_stdout(out):
        try:
            exec(compile(block["code"], f"docs/tour.md, block at line {block['line']}", "exec"), namespace)
        except BaseException:
            error = traceback.format_exc()
    results.append({"line": block["line"], "printed": out.getvalue(), "error": error,
                    "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu})
    if error:
        break
json.dump(results, open(sys.argv[2], "w"))
"""


def run_blocks(todo: list[Block], cwd: Path) -> list[dict]:
    """Run ``todo`` in order in a fresh Python process whose working directory is ``cwd`` (so the figures land in
    ``cwd/docs/tour``), importing this checkout's ropelite. One result per block run: printed text, error, times."""
    cwd.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        todo_path, done_path = Path(tmp) / "todo.json", Path(tmp) / "done.json"
        todo_path.write_text(json.dumps([{"line": b.line, "code": b.code} for b in todo]))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(todo_path), str(done_path)], cwd=cwd, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not done_path.exists():
            raise RuntimeError(f"the tour's process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(done_path.read_text())


def _unit(number: str) -> float | None:
    """One unit of the last printed digit of a number as printed; None for an integer (compared exactly)."""
    mantissa, _, exponent = number.lower().partition("e")
    if "." not in mantissa and not exponent:
        return None
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def mismatch(expected: str, got: str) -> str | None:
    """Why ``got`` does not match ``expected`` under the rule of this module's docstring (None: it matches)."""
    want = [line.rstrip() for line in expected.rstrip("\n").split("\n")] if expected else []
    have = [line.rstrip() for line in got.rstrip("\n").split("\n")] if got.strip() else []
    if len(want) != len(have):
        return f"{len(have)} lines printed, the output block has {len(want)}"
    for n, (w, h) in enumerate(zip(want, have), 1):
        w_text, h_text = NUMBER.split(w), NUMBER.split(h)
        w_num, h_num = NUMBER.findall(w), NUMBER.findall(h)
        if w_text != h_text or len(w_num) != len(h_num):
            return f"line {n} differs:\n  expected: {w}\n  got:      {h}"
        for a, b in zip(w_num, h_num):
            unit = _unit(a)
            same = a == b if unit is None else abs(float(a) - float(b)) <= unit * (1 + 1e-9)
            if not same:
                allowed = "exactly" if unit is None else f"within {unit:g}"
                return (f"line {n}: {b} where the tour prints {a} (numbers must match {allowed}):\n"
                        f"  expected: {w}\n  got:      {h}")
    return None


def problems(todo: list[Block], results: list[dict]) -> list[str]:
    """One message per block whose run failed or whose printed text does not match its output block."""
    found = []
    for block, result in zip(todo, results):
        if result["error"]:
            found.append(f"block at line {block.line} raised:\n{result['error']}")
            continue
        why = mismatch(block.expected or "", result["printed"])
        if why:
            found.append(f"block at line {block.line}: {why}\n--- printed ---\n{result['printed']}")
    if len(results) < len(todo):
        found.append(f"only {len(results)} of {len(todo)} blocks ran")
    return found


def figures(text: str) -> list[str]:
    """The figures the tour shows, as paths under docs/."""
    return FIGURE.findall(text)


# ----------------------------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------------------------

def check_tour(todo: list[Block], cwd: Path, shown: list[str]) -> None:
    results = run_blocks(todo, cwd)
    found = problems(todo, results)
    for figure in shown:
        made = cwd / "docs" / figure
        if not (made.is_file() and made.stat().st_size > 0):
            found.append(f"the tour shows {figure}, which its code did not make (or made empty)")
        if not (ROOT / "docs" / figure).is_file():
            found.append(f"the tour shows {figure}, which is not committed in docs/ (run python tests/test_tour.py)")
    assert not found, "\n\n".join(found)


@pytest.mark.slow
def test_tour_without_smollm2(tmp_path):
    """Every block that does not need SmolLM2, in order, prints what the tour says."""
    text = TOUR.read_text()
    todo = [b for b in blocks(text) if not b.smollm2]
    made_without = [f for f in figures(text) if not _made_by_smollm2(text, f)]
    check_tour(todo, tmp_path, made_without)


@pytest.mark.smollm2
@pytest.mark.books
@pytest.mark.slow
def test_tour_whole(tmp_path):
    """The whole tour, SmolLM2 blocks included, in order, as a reader runs it."""
    text = TOUR.read_text()
    check_tour(blocks(text), tmp_path, figures(text))


def _made_by_smollm2(text: str, figure: str) -> bool:
    """A figure is made by a SmolLM2 block when its file name appears only in such blocks."""
    name = Path(figure).name
    return not any(name in b.code for b in blocks(text) if not b.smollm2)


# The rule itself, on small strings (the tour's own run is the test above).

def test_blocks_pair_code_with_output():
    text = ("intro\n```python\nprint(1)\n```\n\n```output\n1\n```\n"
            f"```python\n{SMOLLM2}\nx = 2\n```\ntext\n```bash\nls\n```\n")
    found = blocks(text)
    assert [(b.line, b.expected, b.smollm2) for b in found] == [(2, "1", False), (9, None, True)]


def test_an_output_block_must_follow_a_python_block():
    with pytest.raises(ValueError, match="follows no python block"):
        blocks("```bash\nls\n```\n```output\nx\n```\n")


def test_mismatch_rule():
    assert mismatch("JS 0.0431 at L=512", "JS 0.0432 at L=512") is None           # one unit of the last digit
    assert "0.0434" in mismatch("JS 0.0431 at L=512", "JS 0.0434 at L=512")       # three units
    assert "exactly" in mismatch("first negative at m=1707", "first negative at m=1706")  # integers exactly
    assert mismatch("b = 1.14e+03", "b = 1.15e+03") is None
    assert mismatch("b = 1.14e+03", "b = 1.16e+03") is not None
    assert "line 1 differs" in mismatch("pi x4: 0.05", "ntk x4: 0.05")               # the words exactly
    assert "2 lines printed" in mismatch("a", "a\nb")
    assert mismatch("", "") is None and mismatch("", "something") is not None       # no block: prints nothing


@pytest.mark.slow
def test_changing_one_printed_output_fails(tmp_path):
    """The harness notices an edited output block: the first block that prints, with one number changed."""
    text = TOUR.read_text()
    first = next(b for b in blocks(text) if b.expected and not b.smollm2 and NUMBER.search(b.expected))
    number = NUMBER.search(first.expected)
    edited = first.expected[:number.start()] + str(float(number.group()) + 1) + first.expected[number.end():]
    todo = [b for b in blocks(text) if not b.smollm2 and b.line <= first.line]
    results = run_blocks(todo, tmp_path)
    assert not problems(todo, results)
    changed = [Block(b.line, b.code, edited if b.line == first.line else b.expected, b.smollm2) for b in todo]
    assert any(f"block at line {first.line}" in p for p in problems(changed, results))


# ----------------------------------------------------------------------------------------------------------------
# Rebuilding the committed figures
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Run docs/tour.md from the repository root: rewrite docs/tour/*.png, "
                                            "print each block's time and every output that no longer matches.")
    p.add_argument("--without-smollm2", action="store_true", help="skip the blocks that need SmolLM2")
    args = p.parse_args(argv)
    todo = [b for b in blocks(TOUR.read_text()) if not (args.without_smollm2 and b.smollm2)]
    start = time.perf_counter()
    results = run_blocks(todo, ROOT)
    for r in results:
        print(f"block at line {r['line']:4}: {r['seconds']:6.1f} s wall, {r['cpu_seconds']:6.1f} s CPU")
    print(f"{len(results)} blocks in {time.perf_counter() - start:.1f} s wall (process start included)")
    found = problems(todo, results)
    print("\n\n".join(found) if found else "every output matches")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
