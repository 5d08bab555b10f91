"""Files that survive a killed run: every write goes to a temporary file beside the target, then is renamed.

The one exception is a JSON-lines log (train.py's metrics.jsonl, eval.jsonl), appended to one row at a time: a
kill mid-write leaves a cut last line, which `read_jsonl` skips.

`lock_out` keeps two runs out of one output folder (an OS lock, so it dies with its process).
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import fcntl
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

from .errors import RopeliteError


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it; put it straight back


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; on success it replaces ``path`` in one rename, so readers
    see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600, and a writer may have put its own file there (safetensors does): give the result
        # the mode a plain open() would
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_LOCKS: dict[Path, object] = {}  # folder -> its open .lock file: the lock lives as long as this process
_MADE: list[Path] = []           # folders lock_out created (parents first): removed at exit if nothing but the lock


def _remove_empty_folders() -> None:
    """At exit: a folder this process made for its output and left holding only its .lock (a run that failed
    before writing anything) is removed, with the parents it made, so a failed run leaves no debris."""
    for folder in reversed(_MADE):
        with contextlib.suppress(OSError):
            if {p.name for p in folder.iterdir()} <= {".lock"}:
                (folder / ".lock").unlink(missing_ok=True)
                folder.rmdir()


def lock_out(folder, flag: str = "--out") -> Path:
    """Make the output ``folder`` and hold an exclusive lock on ``folder/.lock`` until this process ends, so a
    second run on the same folder stops in one line instead of mixing its results in. The lock is the kernel's
    (flock), released whatever way the process dies, so a killed run never leaves a stale one; the file holds
    the holder's pid, for the message. Locking a folder this process already holds is a no-op. A folder it made
    and left holding nothing but the lock when the process ends (the run failed first) is removed then."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RopeliteError(f"{flag} {folder} is a file, not a folder; choose another {flag}")
    try:
        made = [p for p in (folder, *folder.parents) if not p.exists()][::-1]      # outermost first
        folder.mkdir(parents=True, exist_ok=True)
        if made and not _MADE:
            atexit.register(_remove_empty_folders)
        _MADE.extend(p.resolve() for p in made)
        key = folder.resolve()
        if key in _LOCKS:
            return folder
        handle = open(folder / ".lock", "a+")
    except OSError as e:
        raise RopeliteError(f"cannot write to {flag} {folder}: {e.strerror or e}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RopeliteError(f"{flag} {folder} is in use by another run (pid {holder}); wait for it to end or "
                            f"choose another {flag}") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _LOCKS[key] = handle
    return folder


def _clean(value):
    """JSON has no NaN/inf: write them as null rather than emit invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_clean(data), indent=2) + "\n")


def write_csv(path, rows: list[dict]) -> None:
    """One row per dict; columns are the union of keys in first-seen order; lists are written as JSON."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})


def write_results(out_dir, name: str, rows: list[dict]) -> None:
    """``name.json`` and ``name.csv`` in ``out_dir`` from the same rows."""
    write_json(Path(out_dir) / f"{name}.json", rows)
    write_csv(Path(out_dir) / f"{name}.csv", rows)


def settings_id(settings: dict) -> str:
    """A short id of a run's settings (their JSON with sorted keys): rows carry it, so a rerun with the same
    settings can skip what is done and rows of other settings can share the file."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def read_rows(out_dir, name: str, keys: tuple = ("settings",)) -> list[dict]:
    """The rows of ``name.json`` in ``out_dir`` (written by write_results), [] when there is none yet; a file
    that is not such a list of rows with ``keys`` is an error rather than something to overwrite."""
    path = Path(out_dir) / f"{name}.json"
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError:
        rows = None
    if not (isinstance(rows, list) and all(isinstance(r, dict) and set(keys) <= set(r) for r in rows)):
        raise RopeliteError(f"{path} is not a {name} results file; use another --out")
    return rows


def record_settings(out_dir, name: str, settings_by_id: dict[str, dict]) -> None:
    """Add ``settings_by_id`` ({settings_id: settings}) to ``name_settings.json`` in ``out_dir``, the file that
    says what each id carried by the rows of ``name.json`` means; ids already there are kept."""
    path = Path(out_dir) / f"{name}_settings.json"
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        raise RopeliteError(f"{path} is not valid JSON; use another --out") from None
    write_json(path, {**known, **settings_by_id})


SUMMARY_SUFFIX = "_summary.json"


def write_summary(out_dir, name: str, title: str, claim: str, finding: list[str], numbers: dict) -> None:
    """``name_summary.json`` in ``out_dir``: the headline of the results in ``name.json``, written by the script
    that measured them, so a report (paper.py) can quote it knowing none of the script's keys. ``claim``: what the
    paper says; ``finding``: Markdown lines of what was measured, each number with its n and interval, the
    verdict beside the claim; ``numbers``: the same headline numbers as data."""
    write_json(Path(out_dir) / f"{name}{SUMMARY_SUFFIX}",
               {"results": name, "title": title, "claim": claim, "finding": list(finding), "numbers": numbers})


def read_summaries(out_dir) -> list[dict]:
    """Every summary ``write_summary`` left in ``out_dir``, by results name."""
    summaries = []
    for path in sorted(Path(out_dir).glob(f"*{SUMMARY_SUFFIX}")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise RopeliteError(f"{path} is not valid JSON; rerun the script that wrote it") from None
        if not (isinstance(data, dict) and {"title", "claim", "finding", "numbers"} <= set(data)):
            raise RopeliteError(f"{path} is not a results summary (title, claim, finding, numbers)")
        summaries.append(data)
    return summaries


def read_jsonl(path) -> list[dict]:
    """The rows of a JSON-lines file, [] when there is none; a line cut short by a kill is skipped."""
    path, rows = Path(path), []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def append_jsonl(path, row: dict) -> None:
    """One JSON line more; a kill mid-write leaves a cut line that read_jsonl skips."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_jsonl(path, last_step: int) -> None:
    """Keep the rows whose "step" is at most ``last_step`` (a resumed run logs the later ones again), rewriting
    the file atomically."""
    rows = [r for r in read_jsonl(path) if isinstance(r, dict) and r.get("step", 0) <= last_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def markdown_table(rows: list[dict], columns: list[str] | None = None, limit: int = 60) -> str:
    """Rows of scalars as a Markdown table; list/dict cells are left out, floats shown with 4 significant digits."""
    if not rows:
        return "(no rows)\n"
    columns = columns or [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
    cell = (lambda v: f"{v:.4g}" if isinstance(v, float) else "" if v is None else escape_cell(str(v)))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"\n({len(rows) - limit} more rows in the JSON)")
    return "\n".join(lines) + "\n"


def escape_cell(text: str) -> str:
    """A Markdown table cell: a newline or a pipe would end the cell or the row (generated answers hold both)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def pivot(rows: list[dict], index: str, column: str, value: str) -> list[dict]:
    """Long rows (one per index x column) as wide ones: a row per index value, a column per column value."""
    wide: dict = {}
    for r in rows:
        wide.setdefault(r[index], {index: r[index]})[str(r[column])] = r[value]
    return list(wide.values())


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported only by what draws."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi: int = 120) -> None:
    """Write ``fig`` to ``path`` as a PNG, atomically, and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
