"""One run at a time per output: a lock file (`.lock.json`) in the output directory or prefix.

Two runs into one output would both read the same set of written ids, both decode the rest and
write every such row twice. So a run takes the lock before it reads the output, and a second run
is refused (exit 2, nothing started) with the first one's run id, host, pid and start time.

How the lock is taken atomically:
- local (and network) file systems: an exclusive create (`O_CREAT | O_EXCL`);
- S3: a conditional PUT (`If-None-Match: *`, which AWS S3 and MinIO honour). A server that ignores the
  header (older Ceph RGW, some gateways) is recognised by a probe (a second conditional PUT of one
  probe object that succeeds); there the lock is a plain PUT read back a second later, which catches
  a run started while another holds the lock but not two runs started within that second of each
  other. The job says so in its log when it falls back. Other pyarrow file systems (gs://, hdfs://)
  get the same best effort.

A lock left by a killed run must not block for ever. The running job rewrites its lock every
HEARTBEAT_S seconds (a compare-and-swap on the lock's previous content: S3 `If-Match` on its ETag,
locally rename-aside then re-link), and a lock counts as stale when
- its run's process is gone: same host, and no process with that pid and start time; or
- its heartbeat is older than STALE_S (a run on another machine that died, or lost its storage).
A stale lock is taken over (said in the log). `output.break_lock` (`--break-lock`) takes over any
lock: for a run known to be dead whose heartbeat is still recent (killed on another machine a
minute ago). A run whose lock was taken over finds out at its next heartbeat and refuses to call its
output complete.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.config import JobConfigError

LOCK_NAME = ".lock.json"
HEARTBEAT_S = 30.0    # how often a running job rewrites its lock
STALE_S = 300.0       # a lock whose heartbeat is older than this is taken over
_HELD: set[str] = set()  # run ids whose lock this process holds now


class OutputLocked(JobConfigError):
    """Another run holds the output's lock (refused before anything starts; the CLI exits 2)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the lock file records."""

    run_id: str
    host: str
    pid: int
    pid_started_at: float | None   # the process's start time: a reused pid is another process
    started_at: float
    heartbeat_at: float
    argv: list

    @classmethod
    def me(cls, run_id: str) -> "Holder":
        """This process, now."""
        import sys

        now = time.time()
        return cls(run_id, socket.gethostname(), os.getpid(), _process_start(os.getpid()), now, now, list(sys.argv))

    def beat(self) -> "Holder":
        """The same holder with a fresh heartbeat."""
        return Holder(**{**asdict(self), "heartbeat_at": time.time()})

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Holder | None":
        """The holder a lock file names; None for a file that is not one (it is then stale)."""
        try:
            raw = json.loads(data.decode())
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def describe(self) -> str:
        """'run R (host H, pid P, started ..., last heartbeat 12s ago)'."""
        age = time.time() - self.heartbeat_at
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(self.started_at))}, "
                f"last heartbeat {age:.0f}s ago)")


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def stale_reason(h: Holder | None, now: float | None = None) -> str | None:
    """Why a lock no longer protects a live run (its process is gone, its heartbeat is old), or None."""
    if h is None:
        return "the lock file is unreadable"
    now = time.time() if now is None else now
    if h.host == socket.gethostname():
        if h.pid == os.getpid() and h.run_id not in _HELD:
            # an earlier run of this process that could not remove its lock (its output was unreachable)
            return "an earlier run of this process left it"
        started = _process_start(h.pid)
        if started is None:
            return f"its process {h.pid} on this host is gone"
        if h.pid_started_at is not None and abs(started - h.pid_started_at) > 1.0:
            return f"pid {h.pid} on this host is now another process"
    if now - h.heartbeat_at > STALE_S:
        return f"its heartbeat is {now - h.heartbeat_at:.0f}s old (stale after {STALE_S:.0f}s)"
    return None


# ----------------------------------------------------------------------------- where the lock lives

class _LocalFile:
    """The lock as a file of a local or network file system; a token is the file's content."""

    conditional = True

    def __init__(self, path: str) -> None:
        self.path = path

    def create(self, data: bytes) -> bytes | None:
        """Create the lock if there is none (exclusive create); its token, or None where one exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return data

    def read(self) -> tuple[bytes, bytes] | None:
        """(content, token) of the lock, None where there is none."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def swap(self, token: bytes, data: bytes | None) -> bytes | None:
        """Replace the lock by `data` (None: remove it) if it still holds `token`; the new token, or None.

        Rename aside is atomic: of two runs swapping the same lock, one moves it and the other finds
        nothing. A moved lock that is not the expected one goes back by link (an exclusive create).
        """
        aside = f"{self.path}.{uuid.uuid4().hex[:8]}.old"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        try:
            with open(aside, "rb") as f:
                if f.read() != token:
                    _link_back(aside, self.path)
                    return None
            if data is None:
                return b""
            fresh = f"{self.path}.{uuid.uuid4().hex[:8]}.new"
            with open(fresh, "wb") as f:
                f.write(data)
            try:
                os.link(fresh, self.path)
            except FileExistsError:
                return None
            finally:
                os.unlink(fresh)
            return data
        finally:
            if os.path.exists(aside):
                os.unlink(aside)


def _link_back(aside: str, path: str) -> None:
    try:
        os.link(aside, path)
    except FileExistsError:
        pass  # a third run created a lock meanwhile: it holds the output now


class _S3Object:
    """The lock as an S3 object, written with conditional PUTs; a token is the object's ETag."""

    def __init__(self, bucket: str, key: str) -> None:
        import boto3

        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.client = boto3.client("s3", endpoint_url=_endpoint_url(), region_name=region)
        self.bucket, self.key = bucket, key
        self.conditional = self._honours_conditions()

    def _put(self, key: str, data: bytes, **cond: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **cond)["ETag"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                           "NoSuchKey", "412", "409"):
                return None
            raise

    def _honours_conditions(self) -> bool:
        """Whether the server refuses a PUT with If-None-Match: * over an existing object."""
        from botocore.exceptions import ClientError

        probe = f"{self.key}.probe-{uuid.uuid4().hex[:8]}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"probe")
            try:
                return self._put(probe, b"probe", IfNoneMatch="*") is None
            except ClientError:  # 501 NotImplemented and the like: no conditional writes here
                return False
        finally:
            self.client.delete_object(Bucket=self.bucket, Key=probe)

    def create(self, data: bytes) -> str | None:
        if self.conditional:
            return self._put(self.key, data, IfNoneMatch="*")
        if self.read() is not None:
            return None
        etag = self._put(self.key, data)
        time.sleep(1.0)  # best effort without conditions: a run that wrote after us wins, and we see it
        now = self.read()
        return etag if now is not None and now[0] == data else None

    def read(self) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return got["Body"].read(), got["ETag"]

    def swap(self, token: str, data: bytes | None) -> str | None:
        now = self.read()
        if now is None or now[1] != token:
            return None
        if data is None:
            # S3 has no conditional DELETE everywhere; the read above makes the window one request wide
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
            return ""
        if self.conditional:
            return self._put(self.key, data, IfMatch=token)
        return self._put(self.key, data)


class _ArrowFile:
    """The lock as a file of another pyarrow file system (gs://, hdfs://): no atomic create is known
    there, so it is written where absent and read back a second later (best effort, said in the log)."""

    conditional = False

    def __init__(self, fs: pafs.FileSystem, path: str) -> None:
        self.fs, self.path = fs, path

    def _write(self, data: bytes) -> bytes:
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)
        return data

    def create(self, data: bytes) -> bytes | None:
        if self.read() is not None:
            return None
        self._write(data)
        time.sleep(1.0)  # a run that wrote after us wins, and we see it
        now = self.read()
        return data if now is not None and now[0] == data else None

    def read(self) -> tuple[bytes, bytes] | None:
        if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(self.path) as f:
            data = f.read()
        return data, data

    def swap(self, token: bytes, data: bytes | None) -> bytes | None:
        now = self.read()
        if now is None or now[1] != token:
            return None
        if data is None:
            self.fs.delete_file(self.path)
            return b""
        return self._write(data)


def _endpoint_url() -> str | None:
    url = storage.endpoint()
    if url and "://" not in url:
        url = f"https://{url}"
    return url


def _backend(out_dir: str):
    fs, base = storage.filesystem(out_dir)
    if isinstance(fs, pafs.S3FileSystem):
        bucket, _, prefix = base.partition("/")
        return _S3Object(bucket, f"{prefix.rstrip('/')}/{LOCK_NAME}".lstrip("/"))
    if isinstance(fs, pafs.LocalFileSystem):
        return _LocalFile(os.path.join(base, LOCK_NAME))
    return _ArrowFile(fs, f"{base.rstrip('/')}/{LOCK_NAME}")


# ----------------------------------------------------------------------------- the lock

class OutputLock:
    """The output's lock for one run: acquire() before the output is read, release() at the end;
    a heartbeat thread keeps it fresh in between."""

    def __init__(self, out_dir: str, run_id: str, log: Callable[[str], None] = print) -> None:
        self.out_dir, self.run_id, self.log = out_dir, run_id, log
        self._backend = _backend(out_dir)
        self._holder = Holder.me(run_id)
        self._token = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lock is no longer this run's (taken over mid-run)

    def acquire(self, break_lock: bool = False) -> None:
        """Take the lock, taking over a stale one (or any, with break_lock); OutputLocked where a live run holds it."""
        if not self._backend.conditional:
            self.log(f"{self.out_dir}: this storage ignores conditional writes (an S3 server without "
                     "If-None-Match, or not S3), so two runs started within a second of each other could both "
                     "take the lock; start one at a time")
        for _ in range(3):  # a lock that vanishes between our create and read: try again
            self._token = self._backend.create(self._holder.to_bytes())
            if self._token is not None:
                break
            current = self._backend.read()
            if current is None:
                continue
            data, token = current
            holder = Holder.from_bytes(data)
            why = "--break-lock" if break_lock else stale_reason(holder)
            if why is None:
                raise OutputLocked(self._refusal(holder))
            self._token = self._backend.swap(token, self._holder.to_bytes())
            if self._token is not None:
                who = holder.describe() if holder else "an unreadable lock"
                self.log(f"{self.out_dir}: took over the lock of {who}: {why}")
                break
        else:
            current = self._backend.read()
            raise OutputLocked(self._refusal(Holder.from_bytes(current[0]) if current else None))
        _HELD.add(self.run_id)
        self._start_heartbeat()

    def _refusal(self, h: Holder | None) -> str:
        who = h.describe() if h else "another run"
        return (f"output.dir: {self.out_dir} is in use by {who}; two runs into one output would write rows "
                f"twice. Wait for that run to end (or stop it) and rerun; if it is dead (killed on another "
                f"machine), rerun with --break-lock (the lock of a run that died on this host, or whose "
                f"heartbeat is over {STALE_S:.0f}s old, is taken over without it)")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._holder = self._holder.beat()
            try:
                token = self._backend.swap(self._token, self._holder.to_bytes())
            except Exception as e:  # storage unreachable: the next beat tries again; staleness says the rest
                self.log(f"{self.out_dir}: could not refresh the output's lock ({type(e).__name__}: {e})")
                continue
            if token is None:
                current = self._backend.read()
                other = Holder.from_bytes(current[0]) if current else None
                self.lost = (f"the output's lock was taken over by {other.describe()}" if other
                             else "the output's lock was removed")
                self.log(f"{self.out_dir}: {self.lost} while this run was writing; this run will not call "
                         "the output complete")
                return
            self._token = token

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's."""
        self._stop.set()
        _HELD.discard(self.run_id)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._token is not None and self.lost is None:
            try:
                self._backend.swap(self._token, None)
            except Exception as e:  # the storage is what failed (a deleted bucket): nothing left to unlock
                self.log(f"{self.out_dir}: could not remove the output's lock ({type(e).__name__}: {e})")
        self._token = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
