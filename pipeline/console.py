"""What the job's console shows: Ray core lines that are known not to apply are left out of it.

Ray's C++ core worker writes its error-level lines straight to file descriptor 2 of the driver (and
to the driver's log file, python-core-driver-*.log in the session's logs directory). One of them is
printed for every Ray Data actor pool: `E ... core_worker.cc: Actor with class name:
'MapWorker(MapBatches(GenerateActor))' ... has constructor arguments in the object store and
max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor
restart will fail.`

It does not apply to our jobs, and nothing we pass can avoid it. The constructor arguments it
means are not GenerateActor's (an ActorSpec of plain strings and numbers, carried inside Ray Data's
MapTransformer) but Ray Data's own `_MapWorker(ctx, map_transformer, ...)`, which Ray Data 2.60
always hands over as `ray.put` refs (`MapOperator._map_transformer_ref`, `_data_context_ref`).
The driver owns those objects and the operator holds the refs for as long as it runs, so a restart
finds them for the whole job; they could be lost only with the driver's own node, which ends the job
anyway. tests/test_reliability.py kills the one actor of a job three times, the last after six
parts are written, and checks that Ray restarted that same actor three times and the job finished.
"""
from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

# The one Ray core line left out of the job's console (the driver's log file keeps it).
RESTART_ARGS_WARNING = b"has constructor arguments in the object store and max_restarts > 0"


@contextmanager
def stderr_without(*markers: bytes) -> Iterator[None]:
    """Within the block, lines written to file descriptor 2 (by Python or by Ray's C++ core) that hold
    one of `markers` are left out; everything else reaches the console as it came, progress-bar
    carriage returns included."""
    sys.stderr.flush()
    restore, console = os.dup(2), os.dup(2)  # the thread owns (and closes) its own copy
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    forward = threading.Thread(target=_forward, args=(read_end, console, markers), daemon=True,
                               name="stderr-filter")
    forward.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(restore, 2)  # closes the pipe's write end: the thread drains what is left and ends
        os.close(restore)
        # A child process started inside the block keeps the pipe open: then the thread lives on,
        # forwarding its lines, and closes its descriptors when the child goes.
        forward.join(timeout=2.0)


def _forward(read_end: int, console: int, markers: tuple[bytes, ...]) -> None:
    """Copy the pipe to the console line by line, less the lines holding a marker."""
    pending = b""
    try:
        while chunk := os.read(read_end, 1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not any(m in line for m in markers))
            cut = pending.rfind(b"\r") + 1  # a progress bar redraws without a newline: show it now
            if cut and not any(m in pending for m in markers):
                out, pending = out + pending[:cut], pending[cut:]
            _write_all(console, out)
        if pending and not any(m in pending for m in markers):
            _write_all(console, pending)
    except OSError:  # the console is gone: keep draining, or writers would block on a full pipe
        while os.read(read_end, 1 << 16):
            pass
    finally:
        os.close(read_end)
        os.close(console)


def _write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is out."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
