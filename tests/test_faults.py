"""Fault tolerance of `fastmask reproduce` (docs/reliability.md): real runs killed with
SIGKILL, SIGTERM and SIGINT at several points (mid-training, after a checkpoint, and in
the slow test at 6 moments spread over a whole run), then rerun with the same arguments.

After every kill, every file the run left (hidden temporary files aside, which only a
SIGKILL can leave and the next run removes) is whole: every .json parses, every
checkpoint loads, every PNG decodes. The final rerun's results.json figures equal
those of an uninterrupted run. SIGINT and SIGTERM stop with one line on stderr and
exit codes 130 and 143, without a traceback.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastmask import models as M
from fastmask.pipeline import ReproduceConfig, run_reproduce

from test_reliability import figures, write_idx

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("baseline", "random30", "random30_gm")


ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def argv(out, data_dir):
    return [sys.executable, "-m", "fastmask", "reproduce", "--preset", "smoke", "--out", str(out),
            "--data-dir", str(data_dir), "--rows", ",".join(ROWS)]


def _default_sigint():
    # A shell's background job inherits SIGINT ignored, and Python then installs no Ctrl-C
    # handler: give the run the default disposition a terminal user has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(out, data_dir):
    return subprocess.Popen(argv(out, data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, preexec_fn=_default_sigint)


def run_until(proc, ready, sig, delay=0.0, timeout=300):
    """Send `sig` `delay` s after ready(line) first holds for a line of the run's stdout.
    Returns (sent, rc, stdout, stderr)."""
    lines, sent = [], False
    t_end = time.monotonic() + timeout
    for line in proc.stdout:  # one line at a time (PYTHONUNBUFFERED)
        lines.append(line)
        if ready(line):
            time.sleep(delay)
            proc.send_signal(sig)
            sent = True
            break
        assert time.monotonic() < t_end, "the run did not reach the kill point"
    out, err = proc.communicate(timeout=timeout)
    return sent, proc.returncode, "".join(lines) + out, err


def check_whole(out):
    """Every file a run left is complete. Returns the number of files checked."""
    import matplotlib.image as mpimg
    n = 0
    for p in sorted(out.rglob("*")):
        if p.is_dir():
            continue
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            continue  # a SIGKILLed write: never renamed into place, removed by the next run
        n += 1
        assert p.stat().st_size > 0, p
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".pt":
            M.load(p)
        elif p.suffix == ".png":
            assert mpimg.imread(p).ndim == 3, p
        elif p.suffix in (".md", ".csv"):
            assert p.read_text().endswith("\n"), p
    return n


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (in-process) and its figures."""
    root = tmp_path_factory.mktemp("faults")
    data_dir = write_idx(root / "data")
    run_reproduce(ReproduceConfig(out=str(root / "ref"), preset="smoke", rows=ROWS,
                                  data_dir=str(data_dir)), log=lambda *a, **k: None)
    return data_dir, figures(json.loads((root / "ref" / "results.json").read_text()))


def finish(out, data_dir, resumed=True):
    """Rerun to the end; the figures of results.json. Checks every file is whole."""
    proc = start(out, data_dir)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "resumed" in stdout or not resumed
    n = check_whole(out)
    assert not list(out.rglob("*.tmp"))  # the final run removed what SIGKILL left
    return figures(json.loads((out / "results.json").read_text())), n


def test_killed_runs_resume_to_identical_results(tmp_path, reference):
    data_dir, expect = reference
    out = tmp_path / "run"
    # (signal, kill point, delay, expected exit code). Each point is reached in its run: the
    # first three stop a row's training before it can finish, so rows are always left to train.
    faults = [
        (signal.SIGKILL, "] training", 0.0, -signal.SIGKILL),  # mid-training
        (signal.SIGTERM, "] training", 0.1, 143),              # mid-training
        (signal.SIGINT, "] training", 0.1, 130),               # mid-training
        (signal.SIGKILL, "] test acc", 0.3, -signal.SIGKILL),  # a row saved, the next one started
    ]
    checked = 0
    for sig, point, delay, code in faults:
        sent, rc, stdout, stderr = run_until(start(out, data_dir), lambda l: point in l, sig, delay)
        assert sent and rc == code, (sig, sent, rc, stderr[-2000:])
        if sig != signal.SIGKILL:
            assert stderr.strip().splitlines() == [stderr.strip()] and "Traceback" not in stderr
            assert ("interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)") in stderr
            assert "rerun the same command" in stderr
        checked += check_whole(out)
    assert (out / "checkpoints" / "baseline.pt").is_file()
    got, n = finish(out, data_dir)
    assert got == expect
    assert checked + n > 10


@pytest.mark.slow
def test_sigkill_at_moments_spread_over_a_run(tmp_path, reference):
    """SIGKILL at 6 moments spread over a whole run (wherever it is: starting, loading,
    training, evaluating, writing checkpoints or the report), each in a fresh folder, then
    a rerun to the end: whole files after the kill, identical figures after the rerun."""
    data_dir, expect = reference
    t0 = time.monotonic()
    assert subprocess.run(argv(tmp_path / "timing", data_dir), capture_output=True, env=ENV,
                          timeout=300).returncode == 0
    total = time.monotonic() - t0
    landed = 0
    for k, frac in enumerate((0.1, 0.25, 0.4, 0.55, 0.7, 0.85)):
        out = tmp_path / f"kill{k}"
        proc = start(out, data_dir)
        time.sleep(total * frac)
        if proc.poll() is None:
            proc.kill()
            landed += 1
        proc.communicate(timeout=300)
        check_whole(out)
        got, _ = finish(out, data_dir, resumed=False)
        assert got == expect, frac
    assert landed >= 4  # a late kill may find the run already done (machine load varies)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_swallowed_signal_still_stops_the_command(sig, code, monkeypatch, capsys):
    """Library code can catch the exception a signal raises (a SIGTERM landing in torch's lazy
    import of sympy was swallowed there, and the run exited 0): the CLI remembers the signal
    and still ends with its exit code and its one line."""
    from fastmask import cli

    def swallowing_command(args):
        try:
            os.kill(os.getpid(), sig)
            time.sleep(1.0)  # the handler runs here
        except BaseException:  # what the library did
            pass
    monkeypatch.setattr(cli, "cmd_train", swallowing_command)
    # A shell's background job starts with SIGINT ignored, and the CLI rightly leaves that
    # alone: give the test the interactive default it is written for, whoever launched pytest.
    ignored = sig == signal.SIGINT and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli.main(["train", "--out", "unused"]) == code
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    assert "files written so far are complete" in capsys.readouterr().err
    cli.stop_requested()  # nothing pending once main has answered it (the Python API after it runs)
    monkeypatch.setattr(cli, "cmd_train", lambda args: None)
    assert cli.main(["train", "--out", "unused"]) == 0  # the next command starts clean
