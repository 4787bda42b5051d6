"""Probe (RELIABILITY.md F14): SIGKILL a driver that started its own local Ray mid-job, list what its
session leaves running, rerun the same command and check the rerun ended it.

    RAY_AUTH_MODE=disabled .venv/bin/python scripts/probe_killed_driver.py [WORKDIR]

600 sudoku4 prompts, the shipped tiny LLaDA, 1 actor. If other dead sessions' processes are on the
machine, the rerun would end those too, so then it only ends this probe's own and stops.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import leftovers, output  # noqa: E402
from prophet.tasks import get_task  # noqa: E402

work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="killed-driver-"))
out = work / "out"
shutil.rmtree(out, ignore_errors=True)
work.mkdir(parents=True, exist_ok=True)
task = get_task("sudoku4"); exs = task.examples("test", 40, seed=1)
src = work / "p.jsonl"
src.write_text("".join(json.dumps({"prompt": exs[i % 40].prompt}) + "\n" for i in range(600)))
model = ROOT / "checkpoints" / "tiny-llada"
args = [sys.executable, "jobs/generate.py", "--input", str(src), "--output", str(out), "--model", str(model),
        "--engine", "torch", "--gen-length", "8", "--steps", "8", "--slots", "8", "--actors", "1",
        "--batch-size", "8", "--rows-per-file", "8"]
env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
env.pop("RAY_ADDRESS", None)
first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
t0 = time.time()
while len(output.part_files(str(out))) < 3:
    assert first.poll() is None and time.time() - t0 < 300
    time.sleep(0.2)
first.kill(); first.wait()
time.sleep(5)
left = {s: g for s, g in leftovers.stale(leftovers.scan()).items() if s.endswith(f"_{first.pid}")}
print("left after SIGKILL +5s:", {s: [(p.pid, p.title) for p in g] for s, g in left.items()}, flush=True)
import psutil  # noqa: E402
for g in left.values():
    for p in g:
        pr = psutil.Process(p.pid)
        print(" ", p.pid, p.title, pr.memory_info().rss >> 20, "MB, listening", sorted({c.laddr.port for c in pr.net_connections() if c.status == "LISTEN"}))
others = {s: g for s, g in leftovers.stale(leftovers.scan()).items() if not s.endswith(f"_{first.pid}")}
if others:  # the rerun would end them too: processes this probe did not start
    print("other dead sessions' processes present, not running the rerun:", {s: len(g) for s, g in others.items()})
    leftovers.end_leftovers(print, procs=[p for g in left.values() for p in g]); sys.exit(0)
t1 = time.time()
second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
print("rerun rc", second.returncode, f"{time.time()-t1:.1f}s")
print("\n".join(l for l in second.stdout.splitlines() if "ended" in l or "resuming" in l or l.startswith("{")))
pids = [p.pid for g in left.values() for p in g]
print("still alive after rerun:", [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"])
print("stale now (this driver's session):", {s: len(g) for s, g in leftovers.stale(leftovers.scan()).items() if s.endswith(f"_{first.pid}")})
