"""ropelite.cli: the one grid grammar of --lengths / --depths, documented in every --help that takes it; where
--base goes among several variants; the threads every script runs with."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import analyze
import needle
import ropelite.cli
from ropelite.cli import GRID_HELP, free_cores, parse_grid, rope_overrides, set_threads, waits_passively
from ropelite.errors import RopeliteError


# ---------------------------------------------------------------------------------------------------------------
# The grid grammar
# ---------------------------------------------------------------------------------------------------------------

def test_parse_grid():
    assert parse_grid(["0:100:10"], "--depths", integer=False) == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
    paper = parse_grid(["1000:131072:32"], "--lengths", integer=True)
    assert len(paper) == 32 and paper[:3] == [1000, 5196, 9392] and paper[-1] == 131072  # step 4195.9
    assert parse_grid(["4000", "1000", "2000", "1000"], "--lengths", integer=True) == [1000, 2000, 4000]
    assert parse_grid(["12.5", "50"], "--depths", integer=False) == [12.5, 50]
    with pytest.raises(RopeliteError, match="bad --lengths value 'a:b'"):
        parse_grid(["a:b"], "--lengths", integer=True)


def test_start_stop_is_the_powers_of_two():
    assert parse_grid(["1024:131072"], "--lengths") == [1024 << k for k in range(8)]
    assert parse_grid(["64:128"], "--lengths") == [64, 128]
    assert parse_grid(["3:20"], "--lengths") == [3, 6, 12]                  # STOP need not be reached
    assert parse_grid(["5:5"], "--lengths") == [5]
    assert parse_grid(["1e3:1e4"], "--lengths") == [1000, 2000, 4000, 8000]
    assert parse_grid(["1:64"], "--depths", integer=False) == [1, 2, 4, 8, 16, 32, 64]


def test_forms_mix_and_values_are_sorted_distinct_numbers():
    grid = parse_grid(["100", "64:128", "0:10:3", "2e3", "128"], "--lengths")
    assert grid == [0, 5, 10, 64, 100, 128, 2000] and all(type(v) is int for v in grid)
    assert [type(v) for v in parse_grid(["50.0", "12.5"], "--depths", integer=False)] == [float, int]
    assert parse_grid(["7:7:1"], "--lengths") == [7] and parse_grid(["0:1:5"], "--depths", integer=False) == [0, 1]
    assert parse_grid(["0.4:9.6:2"], "--lengths") == [0, 10]                # linspace ends may be fractions


@pytest.mark.parametrize("specs, integer, message", [
    (["2.5"], True, "bad --x value '2.5': give whole numbers, START:STOP or START:STOP:COUNT"),
    (["2k"], False, "bad --x value '2k': give numbers, START:STOP or START:STOP:COUNT"),
    (["1.5:8"], False, "bad --x value '1.5:8'"),                            # powers of two of whole numbers
    (["64:32"], True, "bad --x range '64:32': need 1 <= START <= STOP"),
    (["0:8"], True, "bad --x range '0:8': need 1 <= START <= STOP"),
    (["1:2:3:4"], True, "bad --x value '1:2:3:4'"),
    (["0:100:0"], True, "bad --x range '0:100:0': COUNT must be at least 1"),
    (["0:100:2.5"], True, "bad --x value '0:100:2.5'"),
    (["inf"], True, "bad --x value 'inf'"),
    (["1:inf"], True, "bad --x value '1:inf'"),
    (["0:inf:3"], True, "bad --x value '0:inf:3'"),
    ([], True, "--x is empty"),
])
def test_bad_grids_name_the_flag_and_the_value(specs, integer, message):
    with pytest.raises(RopeliteError) as e:
        parse_grid(specs, "--x", integer=integer)
    assert str(e.value) == message if message.startswith("--") else str(e.value).startswith(message)


@pytest.mark.parametrize("script, argv, flags", [
    (analyze, ["attention", "--help"], ["--lengths"]),
    (analyze, ["bound", "--help"], ["--lengths"]),
    (needle, ["--help"], ["--lengths", "--depths"]),
])
def test_every_grid_flag_documents_the_grammar(capsys, script, argv, flags):
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(argv)
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    indent = lambda line: len(line) - len(line.lstrip())  # noqa: E731
    for flag in flags:   # the option's entry: its line and the more indented lines that continue it
        first = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"{flag} "))
        end = next(i for i in range(first + 1, len(lines)) if indent(lines[i]) <= indent(lines[first]))
        assert " ".join(GRID_HELP.split()) in " ".join(" ".join(lines[first:end]).split()), flag


# ---------------------------------------------------------------------------------------------------------------
# --base among several variants
# ---------------------------------------------------------------------------------------------------------------

def test_base_reaches_the_ntk_variants_or_goes_through_to_be_rejected():
    ropes = ["rope", "pi", "ntk"]
    assert rope_overrides("ntk", 4.0, 1e6, ropes) == {"rope": "ntk", "factor": 4.0, "base": 1e6}
    assert rope_overrides("pi", 4.0, 1e6, ropes) == {"rope": "pi", "factor": 4.0}
    assert rope_overrides("pi", 4.0, 1e6, ["rope", "pi"]) == {"rope": "pi", "factor": 4.0, "base": 1e6}
    assert rope_overrides(None, None, 1e6, [None]) == {"rope": None, "factor": None, "base": 1e6}  # the checkpoint's
    assert rope_overrides("pi", 4.0, None, ["pi"]) == {"rope": "pi", "factor": 4.0}


def test_a_scaling_variant_takes_the_checkpoints_factor_or_needs_one():
    from ropelite.cli import variant_config
    from ropelite.errors import RopeliteError
    from ropelite.model import LlamaConfig
    from ropelite.rope import RopeConfig
    shape = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                 num_key_value_heads=1, head_dim=8)
    plain = LlamaConfig(**shape, rope=RopeConfig(theta=1e4, original_max_position_embeddings=64))
    yarn8 = LlamaConfig(**shape, rope=RopeConfig(type="yarn", theta=1e4, factor=8.0, original_max_position_embeddings=64))
    assert variant_config(yarn8, "yarn", None, None, ["yarn"]).rope.factor == 8.0      # the checkpoint's own
    assert variant_config(yarn8, None, None, None, [None]).rope == yarn8.rope
    assert variant_config(plain, "pi", 4.0, None, ["pi"]).rope.factor == 4.0
    assert variant_config(plain, "ntk", None, 1e6, ["ntk"]).rope.base == 1e6            # a base needs no factor
    assert variant_config(plain, "rope", None, None, ["rope"]).rope == plain.rope
    for rope in ("pi", "ntk", "dynamic", "yarn", "llama3"):
        with pytest.raises(RopeliteError, match=f"--rope {rope} needs --factor: the checkpoint runs rope"):
            variant_config(plain, rope, None, None, [rope])
    with pytest.raises(RopeliteError, match="--rope pi needs --factor: the checkpoint runs yarn x8"):
        variant_config(yarn8, "pi", None, None, ["pi"])
    # a script's default (analyze.py's, train.py's len / L) fills exactly the case that is an error without one
    assert variant_config(plain, "pi", None, None, ["pi"], default=4.0).rope.factor == 4.0
    assert variant_config(yarn8, "yarn", None, None, ["yarn"], default=4.0).rope.factor == 8.0
    assert variant_config(plain, "ntk", None, 1e6, ["ntk"], default=4.0).rope.factor == 1.0
    for bad in (float("nan"), float("inf"), 0.0, -1.0, 0.5):
        with pytest.raises(RopeliteError, match=r"rope factor must be >= 1 \(extension, not compression\)"):
            variant_config(plain, "pi", bad, None, ["pi"], default=4.0)


# ---------------------------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
# Every script that computes on a CPU; not benchmarks/gpu.py (GPU machines), memory_estimate.py (arithmetic on
# shapes) and measure.py (a module of the benchmarks), nor bench_threads.py, whose measurements choose the import
# order themselves (they compare spinning with passive waiting).
SCRIPTS = sorted([p for p in ROOT.glob("*.py")] + [
    p for p in (ROOT / "benchmarks").glob("*.py")
    if p.name not in ("gpu.py", "memory_estimate.py", "measure.py", "bench_threads.py")])


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_imports_ropelite_before_torch(script):
    """So that libgomp starts with OMP_WAIT_POLICY=PASSIVE (ropelite/__init__.py sets it only while torch is not
    loaded): importing the script in a fresh interpreter whose environment does not set it leaves it PASSIVE."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join([str(script.parent), str(ROOT)])
    code = f"import os, {script.stem}; print(os.environ.get('OMP_WAIT_POLICY'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "PASSIVE"


@pytest.mark.slow
def test_ropelite_asks_for_passive_waiting_only_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(ROOT)
    code = "import os, {}, {}; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    for first, second, extra, expected in (
            ("ropelite", "torch", {}, "PASSIVE 3000"),
            ("torch", "ropelite", {}, "None None"),                       # too late: libgomp has read them
            ("ropelite", "torch", {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),   # the user's choice is kept
            ("ropelite", "torch", {"GOMP_SPINCOUNT": "0"}, "PASSIVE 0")):
        done = subprocess.run([sys.executable, "-c", code.format(first, second)], env=env | extra,
                              capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == expected, done.stderr


@pytest.fixture
def two_threads():
    """torch at 2 threads for the test (the suite runs at 1), put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_set_threads_keeps_every_core_when_waiting_passively(monkeypatch, two_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    monkeypatch.setattr(ropelite.cli, "free_cores", lambda: 1)      # another job holds a core
    assert waits_passively() and set_threads() == 2 == torch.get_num_threads()


def test_set_threads_takes_only_the_free_cores_when_threads_spin(monkeypatch, two_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)               # torch was imported first: libgomp spins
    monkeypatch.setattr(ropelite.cli, "free_cores", lambda: 1)
    assert not waits_passively() and set_threads() == 1 == torch.get_num_threads()


def test_set_threads_keeps_omp_num_threads(monkeypatch, two_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(ropelite.cli, "free_cores", lambda: 1)
    assert set_threads() == 2


@pytest.mark.parametrize("idle_share, expected", [(1.0, 4), (0.76, 3), (0.5, 2), (0.0, 1)])
def test_free_cores_are_the_idle_share_of_the_cores_now(monkeypatch, idle_share, expected):
    samples = iter([(1000, 0), (1400, int(400 * idle_share))])         # (all ticks, idle ticks) of 4 CPUs
    monkeypatch.setattr(ropelite.cli, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert free_cores(interval=0) == expected
