"""Shared fixtures: a small synthetic DATA DIR built once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """An easy world: 600 train, 50 val, 120 per test split, seed 3."""
    from agevlm_edge.data.synth import synthesize

    out = tmp_path_factory.mktemp("world") / "data"
    synthesize(out, preset="easy", seed=3, n_train=600, n_val=50, n_test=120, workers=1)
    return out


def run_cli(*args: str, check_rc: int | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    """Run the real `agevlm` entry point in a subprocess (exit codes, stderr as users see them);
    ``stdin``: what it reads on standard input."""
    proc = subprocess.run([sys.executable, "-m", "agevlm_edge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, input=stdin)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, exactly one non-empty stderr line, no traceback, mentioning each fragment."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
