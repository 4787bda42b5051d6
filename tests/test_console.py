"""pipeline.console: the one Ray core line known not to apply is left out of the console, nothing else."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Writes to file descriptor 2 as Ray's C++ core does (os.write, no Python buffering) and as Python does.
CHILD = r"""
import os, sys
from pipeline.console import RESTART_ARGS_WARNING, stderr_without
print("before", file=sys.stderr, flush=True)
with stderr_without(RESTART_ARGS_WARNING):
    os.write(2, b"[2026-12-03 17:11:06,261 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker(x)' "
                b"has constructor arguments in the object store and max_restarts > 0. If the arguments...\n")
    os.write(2, b"[2026-12-03 17:11:06,262 E 1 1] core_worker.cc:99: another error\nbar 1\rbar 2\r")
    print("python line", file=sys.stderr, flush=True)
    os.write(2, b"no newline at the end")
print("|after", file=sys.stderr, flush=True)
"""


def test_stderr_without_drops_only_the_marked_line_and_restores_the_console():
    p = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, timeout=60, check=True)
    assert p.stderr == (b"before\n[2026-12-03 17:11:06,262 E 1 1] core_worker.cc:99: another error\n"
                        b"bar 1\rbar 2\rpython line\nno newline at the end|after\n")
