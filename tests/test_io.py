"""ropelite.io: the --out lock (an OS lock that dies with its holder) and the modes of atomically written files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ropelite.errors import RopeliteError
from ropelite.io import atomic_path, lock_out, write_json

ROOT = Path(__file__).resolve().parents[1]


def hold(folder: Path) -> subprocess.Popen:
    """Another process that locks ``folder`` and keeps it until its stdin closes (it says 'locked' first)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from ropelite.io import lock_out; "
                               f"lock_out({str(folder)!r}); print('locked', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_locked_folder_names_its_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    out = tmp_path / "out"
    holder = hold(out)
    try:
        with pytest.raises(RopeliteError) as e:
            lock_out(out)
        assert str(e.value) == (f"--out {out} is in use by another run (pid {holder.pid}); wait for it to end or "
                                "choose another --out")
        assert (out / ".lock").read_text() == f"{holder.pid}\n"
    finally:
        holder.kill()   # SIGKILL: no chance to clean up, the kernel drops the lock
        holder.wait()
    assert lock_out(out) == out and (out / ".lock").read_text() == f"{os.getpid()}\n"
    assert lock_out(out) == out   # this process holds it already: a no-op


def test_lock_out_makes_the_folder_and_refuses_a_file(tmp_path):
    assert lock_out(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RopeliteError, match=r"^--out .*file is a file, not a folder; choose another --out$"):
        lock_out(tmp_path / "file")
    with pytest.raises(RopeliteError, match=r"^cannot write to --results .*file/sub: Not a directory$"):
        lock_out(tmp_path / "file" / "sub", flag="--results")


def test_atomic_files_get_a_plain_write_mode_even_when_the_writer_replaces_the_file(tmp_path):
    (tmp_path / "plain").write_text("x")
    plain = (tmp_path / "plain").stat().st_mode & 0o777
    write_json(tmp_path / "a.json", {"a": 1})
    with atomic_path(tmp_path / "b.bin") as tmp:   # as safetensors does: a new file of its own at the path
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("a.json", "b.bin")] == [plain, plain]


def test_summaries_are_read_back_as_written_and_a_foreign_file_is_an_error(tmp_path):
    from ropelite.io import read_summaries, write_summary
    assert read_summaries(tmp_path) == []
    write_summary(tmp_path, "ppl", "Perplexity", "RoPE fails past L", ["- rope 9.0 [8.0, 10.0] (n=4)"], {"x": 1.5})
    write_summary(tmp_path, "needle", "Needle", "entropy rises", ["- 3/5 cells"], {})
    got = read_summaries(tmp_path)
    assert [s["results"] for s in got] == ["needle", "ppl"]
    assert got[1] == {"results": "ppl", "title": "Perplexity", "claim": "RoPE fails past L",
                      "finding": ["- rope 9.0 [8.0, 10.0] (n=4)"], "numbers": {"x": 1.5}}
    write_json(tmp_path / "other_summary.json", {"rows": []})
    with pytest.raises(RopeliteError, match="not a results summary"):
        read_summaries(tmp_path)


@pytest.mark.parametrize("existed", [False, True])
def test_a_run_that_fails_before_writing_leaves_no_folder_it_made(tmp_path, existed):
    out = tmp_path / "new" / "out"
    if existed:
        out.mkdir(parents=True)
    code = ("from ropelite.cli import check, run_script; from ropelite.io import lock_out\n"
            f"run_script(lambda: (lock_out({str(out)!r}), check(False, 'bad input')))")
    failed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stderr.strip() == "error: bad input"
    assert out.is_dir() == existed and (tmp_path / "new").is_dir() == existed
    # a run that wrote something keeps its folder
    wrote = ("from ropelite.io import lock_out, write_json\n"
             f"write_json(lock_out({str(out)!r}) / 'rows.json', [])")
    assert subprocess.run([sys.executable, "-c", wrote], cwd=ROOT).returncode == 0
    assert (out / "rows.json").is_file()
