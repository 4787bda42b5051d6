"""Processes a SIGKILLed driver's local Ray leaves behind, found and ended before the next local Ray starts.

A driver that starts its own Ray (`ray.init(address="local")`) takes the session down with it on
Ctrl-C or SIGTERM. SIGKILLed, it cannot: its GCS and raylet die with it, but the raylet's agents
(`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) live on for minutes, holding about 100-130 MB each
and the dashboard agent's default port 52365. They belong to exactly one session: their open log
files lie in `<temp dir>/session_<date>_<pid>/logs/`. A session is dead when no raylet and no GCS
process names its directory. `ray stop --force` also ends them, but it ends every Ray of the user on
the machine, live clusters included; this ends only `ray::` processes of dead sessions, and only the
current user's.
"""
from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Callable, Iterable

_SESSION = re.compile(r"(/\S*?/session_\d{4}-\d\d-\d\d_[0-9_-]+)(?:/|$)")
_DAEMONS = ("raylet", "gcs_server")  # a session is alive while either of them is


@dataclass(frozen=True)
class Proc:
    """What the detection needs of one process."""

    pid: int
    argv: tuple[str, ...]        # its command line (a Ray worker's is its title, e.g. `ray::DashboardAgent`)
    paths: tuple[str, ...] = ()  # files it holds open

    @property
    def title(self) -> str:
        """The command line as one line (a retitled process pads its title with blanks)."""
        return " ".join(" ".join(self.argv).split())


def session_of(texts: Iterable[str]) -> str | None:
    """The Ray session directory the first of `texts` (paths, arguments) that names one lies in."""
    for text in texts:
        m = _SESSION.search(text)
        if m:
            return m.group(1)
    return None


def live_sessions(procs: Iterable[Proc]) -> set[str]:
    """Session directories some running raylet or GCS server names on its command line."""
    live = set()
    for p in procs:
        if p.argv and os.path.basename(p.argv[0]) in _DAEMONS:
            if (s := session_of(p.argv)) is not None:
                live.add(s)
    return live


def stale(procs: list[Proc]) -> dict[str, list[Proc]]:
    """`ray::` processes whose session has no raylet or GCS left, by session directory."""
    live = live_sessions(procs)
    found: dict[str, list[Proc]] = {}
    for p in procs:
        if not p.title.startswith("ray::"):
            continue
        s = session_of(p.paths)
        if s is not None and s not in live:
            found.setdefault(s, []).append(p)
    return found


def scan() -> list[Proc]:
    """This user's processes (command line, open files); those that vanish or refuse are left out."""
    import psutil

    me = os.getuid()
    procs = []
    for p in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            if p.info["uids"] is None or p.info["uids"].real != me or not p.info["cmdline"]:
                continue
            argv = tuple(p.info["cmdline"])
            # open files only where they matter: Ray's workers (titles `ray::...`)
            paths = tuple(f.path for f in p.open_files()) if " ".join(argv).startswith("ray::") else ()
            procs.append(Proc(p.pid, argv, paths))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return procs


def end(procs: list[Proc], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL what is still there after `grace_s`."""
    import psutil

    handles = []
    for p in procs:
        try:
            h = psutil.Process(p.pid)
            h.send_signal(signal.SIGTERM)
            handles.append(h)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(handles, timeout=grace_s)
    for h in alive:
        try:
            h.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def end_leftovers(log: Callable[[str], None] = print, procs: list[Proc] | None = None) -> list[Proc]:
    """End the `ray::` processes of dead Ray sessions of this user and say so; returns what was ended."""
    t0 = time.monotonic()
    found = stale(scan() if procs is None else procs)
    ended = [p for group in found.values() for p in group]
    if ended:
        end(ended)
        for session, group in sorted(found.items()):
            log(f"ended {len(group)} processes left by the dead Ray session {session} (its raylet and GCS are "
                f"gone, e.g. a SIGKILLed driver): " + ", ".join(f"{p.pid} {p.title}" for p in group)
                + f" ({time.monotonic() - t0:.1f}s)")
    return ended
