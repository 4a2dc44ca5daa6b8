"""Run untrusted generated code (HumanEval completions) in a sandboxed subprocess.

Layers, each enough to stop the usual accident on its own:
- a fresh process in its own session, killed (its whole process group) at `timeout` seconds of wall
  time, with RLIMIT_CPU as a second clock;
- RLIMIT_AS (memory), RLIMIT_FSIZE (file size), RLIMIT_NOFILE, no core dumps;
- RLIMIT_NPROC 1 under a uid of its own (when we are root: a fresh uid per run, so the count is
  its own; otherwise our uid, whose processes already exceed it): fork and threads fail;
- a network namespace of its own (unshare(CLONE_NEWNET): no interfaces but a down loopback) when
  the kernel lets us, and in any case a guard that makes socket creation raise;
- its own temporary directory as cwd and HOME, removed afterwards; in a mount namespace of its own
  (root) the world-writable directories (/tmp, /var/tmp, /dev/shm, /run/lock) are empty read-only
  tmpfs but for that directory, so a uid that owns nothing can write nowhere else; the guard also
  refuses to open files for writing outside it;
- `python -I` (no user site, no PYTHON* variables) with an empty environment.
A program passes when it exits 0 before the time limit; anything else (an exception, a kill, a
limit hit) is a failure, and the evaluator carries on.
"""

from __future__ import annotations

import ctypes
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

CLONE_NEWNET, CLONE_NEWNS = 0x40000000, 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
# the places any uid may write; in the child's mount namespace they are its own directory or empty
SHARED_WRITABLE = ("/var/tmp", "/dev/shm", "/run/lock")

# Runs first in the child, then the program. Blocks what the rlimits do not: sockets, writes
# outside the sandbox directory, and the process-spawning calls.
GUARD = r"""
import builtins, io, os, socket, sys
_root = os.path.realpath(os.getcwd())
def _refuse(*a, **k):
    raise PermissionError("sandbox: not allowed")
class _NoSocket(socket.socket):
    def __init__(self, *a, **k):
        raise PermissionError("sandbox: no network")
socket.socket = _NoSocket
for _n in ("create_connection", "socketpair", "fromfd", "create_server"):
    setattr(socket, _n, _refuse)
def _inside(path):
    return os.path.realpath(os.path.join(_root, os.fsdecode(path))).startswith(_root + os.sep)
_open = builtins.open
def _guarded_open(file, mode="r", *a, **k):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
        if not _inside(file):
            raise PermissionError(f"sandbox: no writing outside the sandbox: {file}")
    return _open(file, mode, *a, **k)
builtins.open = io.open = _guarded_open
_os_open = os.open
def _guarded_os_open(path, flags, *a, **k):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and not _inside(path):
        raise PermissionError(f"sandbox: no writing outside the sandbox: {path}")
    return _os_open(path, flags, *a, **k)
os.open = _guarded_os_open
for _n in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "spawnv", "kill",
           "killpg", "setsid", "remove", "unlink", "rmdir", "removedirs", "rename", "chmod"):
    if hasattr(os, _n):
        setattr(os, _n, _refuse)
import subprocess
subprocess.Popen = _refuse
del builtins, io, socket
import runpy
runpy.run_path(sys.argv[1], run_name="__main__")
"""


@dataclass
class Outcome:
    passed: bool
    reason: str  # "passed", "failed" (non-zero exit), "timeout", "killed by signal N", "output over N bytes"
    stdout: str = ""
    stderr: str = ""


def _isolate(workdir: str) -> None:
    """In the child, when the kernel lets us (root): a network namespace of its own (nothing to
    connect to) and a mount namespace where the world-writable directories are empty and
    read-only, but for the sandbox directory itself, bound back in place."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare(CLONE_NEWNET)
    if libc.unshare(CLONE_NEWNS) != 0:
        return
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return
    top = "/" + workdir.strip("/").split("/")[0]  # /tmp
    for d in (top, *SHARED_WRITABLE):
        if os.path.isdir(d) and libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"size=1m") != 0:
            raise OSError(ctypes.get_errno(), f"sandbox: cannot cover {d}")
    os.makedirs(workdir)  # in the fresh tmpfs, then the real directory bound onto it
    if libc.mount(b"/proc/self/cwd", workdir.encode(), None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), "sandbox: cannot bind its directory")
    for d in (top, *SHARED_WRITABLE):
        if os.path.isdir(d):
            libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_REMOUNT | MS_RDONLY, None)
    os.chdir(workdir)


def _limits(timeout: float, memory_mb: int, uid: int | None, workdir: str):
    def apply() -> None:
        os.setsid()
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        mem = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _isolate(workdir)
        if uid is not None:  # root: drop to a uid nobody else runs as
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))

    return apply


def _world_runnable(path: str) -> bool:
    """Whether any uid may run `path`: the file world-executable, every directory above it
    world-searchable (a uid of its own cannot run a Python under /root, say)."""
    real = os.path.realpath(path)
    if not os.path.isfile(real) or not os.stat(real).st_mode & 0o001:
        return False
    d = os.path.dirname(real)
    while True:
        if not os.stat(d).st_mode & 0o001:
            return False
        if d == os.path.dirname(d):
            return True
        d = os.path.dirname(d)


def _interpreter(uid: int | None, python: str | None) -> str:
    """The Python to run the program with: the given one, else ours, else (when dropping to a
    uid of its own and ours is out of its reach) the system's python3."""
    if python or uid is None or _world_runnable(sys.executable):
        return python or sys.executable
    for d in ("/usr/bin", "/bin", "/usr/local/bin"):
        candidate = os.path.join(d, "python3")
        if _world_runnable(candidate):
            return candidate
    raise RuntimeError(
        f"sandbox: no Python another uid may run ({sys.executable} is out of its reach and no "
        "world-executable python3 in /usr/bin, /bin or /usr/local/bin): pass python="
    )


def run_program(
    source: str, timeout: float = 10.0, memory_mb: int = 1024, python: str | None = None
) -> Outcome:
    """Run `source` as a Python program in the sandbox; see the module docstring."""
    workdir = tempfile.mkdtemp(prefix="megatron_lite_sandbox_")
    uid = 200_000 + secrets.randbelow(100_000) if os.geteuid() == 0 else None
    try:
        program = os.path.join(workdir, "program.py")
        guard = os.path.join(workdir, "_guard.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        with open(guard, "w", encoding="utf-8") as f:
            f.write(GUARD)
        if uid is not None:
            for p in (workdir, program, guard):
                os.chown(p, uid, uid)
        proc = subprocess.Popen(
            [_interpreter(uid, python), "-I", "-B", "_guard.py", "program.py"],
            cwd=workdir,
            env={"HOME": workdir, "TMPDIR": workdir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_limits(timeout, memory_mb, uid, workdir),
        )
        flood = threading.Event()
        captures = [_Capture(pipe, flood, proc.pid) for pipe in (proc.stdout, proc.stderr)]
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            proc.wait()
        finally:  # anything it left behind in its group, gone before we return
            _kill_group(proc.pid)
            _wait_group_gone(proc.pid)
            for c in captures:
                c.join()
        out, err = (_text(bytes(c.tail)) for c in captures)
        if flood.is_set():
            return Outcome(False, f"output over {MAX_OUTPUT_BYTES} bytes", out, err)
        if timed_out:
            return Outcome(False, "timeout", out, err)
        if proc.returncode == 0:
            return Outcome(True, "passed", out, err)
        reason = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else "failed"
        return Outcome(False, reason, out, err)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


MAX_OUTPUT_BYTES = 1 << 20  # what a program may write to stdout + stderr each; past it, a failure


class _Capture(threading.Thread):
    """Reads one of the program's pipes to its end, keeping only the last 16 KiB: a program that
    writes past MAX_OUTPUT_BYTES is killed (its group) and fails, so a flood costs no memory."""

    def __init__(self, pipe, flood: threading.Event, pgid: int):
        super().__init__(daemon=True)
        self.pipe, self.flood, self.pgid = pipe, flood, pgid
        self.tail, self.total = bytearray(), 0
        self.start()

    def run(self) -> None:
        with self.pipe:
            while chunk := self.pipe.read1(1 << 16):
                self.total += len(chunk)
                self.tail += chunk
                del self.tail[: -(1 << 14)]
                if self.total > MAX_OUTPUT_BYTES and not self.flood.is_set():
                    self.flood.set()
                    _kill_group(self.pgid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, limit_s: float = 5.0) -> None:
    """Until no process of the (killed, leader reaped) group is left, at most `limit_s`: a SIGKILL
    is delivered asynchronously, and the orphans' reaping by init takes a moment."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")[-4000:]
