"""One run per output directory: two real hyperflux-compile processes on one --out, kill -9, the lock itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hyperflux_fx.report.outdir import OutputLocked, RunLock, atomic_write_text, lock_path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "digits_cnn.py")
FAST = ["--dense-epochs", "1", "--epochs", "1", "--regrowth-epochs", "0.5", "--quiet", "--no-export"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMINGS = {"wall_seconds", "latency_table"}  # what may differ between two runs of the same command


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hyperflux_fx.cli", EXAMPLE, *args]


def _start(out: Path) -> subprocess.Popen:
    """A first run, returned once it holds the lock and has begun writing OUT.partial."""
    proc = subprocess.Popen(_cli("--out", str(out), *FAST), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    partial = out.with_name(out.name + ".partial")
    deadline = time.time() + 120
    while not ((partial / "run.log").exists() and (partial / "run.log").stat().st_size > 0 and lock_path(out).exists()
               and lock_path(out).read_text().strip() == str(proc.pid)):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    return proc


def _files(path: Path) -> dict[str, int]:
    """File name -> inode, less the first run's own temporary files (its checkpoints are replaced by rename)."""
    out = {}
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.name.startswith("."):
                out[str(p.relative_to(path))] = p.stat().st_ino
        except FileNotFoundError:  # a temporary file renamed away while we looked
            pass
    return out


def _summary(out: Path) -> dict:
    summary = {k: v for k, v in json.loads((out / "summary.json").read_text()).items() if k not in TIMINGS}
    # the per-group sensitivity runs under a time budget: on a loaded machine it measures fewer groups
    summary.pop("sensitivity", None)
    return summary


@pytest.fixture(scope="module")  # `make test` runs --dist loadfile: one worker runs this module, once
def solo(tmp_path_factory) -> dict:
    """The summary of the run alone (no other process on its --out), to compare the contended runs with."""
    out = tmp_path_factory.mktemp("solo") / "run"
    assert subprocess.run(_cli("--out", str(out), *FAST), cwd=ROOT, env=ENV).returncode == 0
    return _summary(out)


def test_a_second_run_on_the_same_out_exits_2_and_touches_nothing(tmp_path, solo):
    out = tmp_path / "run"
    first = _start(out)
    partial = out.with_name("run.partial")
    log_head = (partial / "run.log").read_text().splitlines()[0]
    for extra in ([], ["--force"]):  # --resume is refused alike (the same check, before anything else)
        before = _files(partial)
        second = subprocess.run(_cli("--out", str(out), *FAST, *extra), cwd=ROOT, env=ENV, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2, (extra, second.stderr)
        assert second.stderr.strip() == (f"hyperflux-compile: error: another hyperflux-compile (pid {first.pid}) is "
                                         f"writing {out}; wait for it or choose another --out")
        after = _files(partial)
        assert set(before) <= set(after), extra  # nothing removed
        written_once = [n for n in before if n in ("dense.pt", "run.log")]
        assert written_once and all(after[n] == before[n] for n in written_once), extra  # nor replaced
        assert (partial / "run.log").read_text().splitlines()[0] == log_head
    assert first.wait(timeout=300) == 0, first.communicate()
    assert not lock_path(out).exists() and not partial.exists()
    assert _summary(out) == solo  # the first run is what it would have been alone


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, solo):
    out = tmp_path / "run"
    first = _start(out)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert lock_path(out).exists()  # the file stays; the OS released the lock with the process
    resumed = subprocess.run(_cli("--out", str(out), *FAST, "--resume"), cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _summary(out) == solo and not lock_path(out).exists()  # resumed after kill -9: the uninterrupted result
    # a plain run after a kill proceeds too (stopped after one interval: the lock is what is checked)
    other = tmp_path / "other"
    killed = _start(other)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    plain = subprocess.run(_cli("--out", str(other), *FAST, "--max-intervals", "1"), cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr


def test_the_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        assert lock_path(out).read_text() == str(os.getpid())
        with pytest.raises(OutputLocked, match=f"pid {os.getpid()}") as err:
            RunLock(out).acquire()
        assert str(out) in str(err.value)
    assert not lock_path(out).exists()
    with RunLock(out):  # free again
        pass


def test_without_fcntl_a_stale_pid_is_taken_over_and_a_live_one_refused(tmp_path):
    out = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(out).write_text(dead.stdout.strip())  # a pid that no longer runs
    lock = RunLock(out)
    lock._acquire_exclusive()
    assert lock_path(out).read_text() == str(os.getpid())
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.release()
        lock_path(out).write_text(str(live.pid))
        with pytest.raises(OutputLocked, match=f"pid {live.pid}"):
            RunLock(out)._acquire_exclusive()
    finally:
        live.kill()
        live.wait()


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "{}")
    atomic_write_text(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}' and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
