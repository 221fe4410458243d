"""Run untrusted, model-written Python programs in a contained subprocess.

Each program gets:

- a fresh temporary working directory (removed afterwards) and a scrubbed environment;
- resource limits set with ``resource.setrlimit`` in the child before exec: address space,
  CPU seconds, file size, open files and process count;
- its own session / process group, killed as a whole at the end, plus a wall-clock timeout;
- when the evaluator runs as root: a private, otherwise unused uid (``RLIMIT_NPROC`` is not enforced
  for root, and a separate uid can neither signal the evaluator nor write its files); every process
  left with that uid is killed after the run;
- when Debian's ``bubblewrap`` is available: a network namespace (no network, not even loopback),
  a pid namespace, and a read-only view of the filesystem except the working directory and an
  empty private ``/tmp``. Where ``bwrap`` is missing or fails its probe, programs run without it
  and one warning is logged.

Usage::

    from src.sandbox import run_program, run_many
    result = run_program("print(1 + 1)", timeout=5.0)
    result.passed, result.status, result.stdout  # (True, "passed", "2\\n")
    results = run_many([src_a, src_b], workers=4, timeout=10.0)
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_TAIL_CHARS = 2000
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
# Private uids: a block per evaluator process so concurrent evaluators never share one (the
# after-run sweep kills every process of a uid). Far above the range of real accounts.
_UID_BASE = 1_000_000
_UIDS_PER_PROCESS = 256


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program: ``status`` is "passed" (exit 0), "failed" or "timeout"."""

    passed: bool
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


@dataclass(frozen=True)
class Limits:
    """Per-program limits. ``cpu_seconds`` defaults to the timeout rounded up, plus one."""

    timeout: float = 10.0
    memory_mb: int = 1024
    cpu_seconds: int | None = None
    file_size_mb: int = 16
    max_processes: int = 16
    open_files: int = 256

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"sandbox timeout must be > 0 seconds, got {self.timeout}")
        for name in ("memory_mb", "file_size_mb", "max_processes", "open_files"):
            if getattr(self, name) < 1:
                raise ValueError(f"sandbox {name} must be >= 1, got {getattr(self, name)}")


class _UidPool:
    """Hands out private uids, one per running program, when the evaluator is root."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._next = 0

    def acquire(self) -> int | None:
        if os.geteuid() != 0:
            return None
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._next >= _UIDS_PER_PROCESS:
                raise RuntimeError(f"more than {_UIDS_PER_PROCESS} programs running at once")
            base = _UID_BASE + (os.getpid() % 10_000) * _UIDS_PER_PROCESS
            self._next += 1
            return base + self._next - 1

    def release(self, uid: int | None) -> None:
        if uid is not None:
            with self._lock:
                self._free.append(uid)


_UIDS = _UidPool()
_BWRAP_LOCK = threading.Lock()
_bwrap_ok: bool | None = None
_PYTHON_LOCK = threading.Lock()
_python: str | None = None
_SUBREAPER_LOCK = threading.Lock()
_subreaper = False
_PR_SET_CHILD_SUBREAPER = 36


def _bwrap_command(workdir: Path) -> list[str]:
    """bwrap prefix: no network, own pid namespace, read-only root, writable ``workdir`` only."""
    return [
        "bwrap",
        "--unshare-user",
        "--disable-userns",
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--die-with-parent",
        "--new-session",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--size", str(64 * 2**20),
        "--tmpfs", "/tmp",
        "--tmpfs", "/dev/shm",
        "--bind", str(workdir), str(workdir),
        "--chdir", str(workdir),
        "--",
    ]  # fmt: skip


def bwrap_available() -> bool:
    """Whether bubblewrap runs here with our flags (probed once; warns once when it does not)."""
    global _bwrap_ok
    with _BWRAP_LOCK:
        if _bwrap_ok is None:
            _bwrap_ok = _probe_bwrap()
            if not _bwrap_ok:
                log.warning(
                    "bubblewrap (bwrap) is missing or fails here: sandboxed programs run WITHOUT a "
                    "network namespace or read-only filesystem; run scripts/install_system_deps.sh"
                )
        return _bwrap_ok


def _probe_bwrap() -> bool:
    if shutil.which("bwrap") is None:
        return False
    uid = _UIDS.acquire()
    try:
        with _workspace(uid) as (workdir, _):
            return _runs_as(uid, [*_bwrap_command(workdir), "true"])
    finally:
        _UIDS.release(uid)


def _interpreter(uid: int | None) -> str:
    """A Python the sandbox uid can execute: this one, else the system's (probed once)."""
    global _python
    with _PYTHON_LOCK:
        if _python is None:
            candidates = [sys.executable, shutil.which("python3", path=_SAFE_PATH)]
            found = next((c for c in candidates if c and _runs_as(uid, [c, "-I", "-c", ""])), None)
            if found is None:
                raise RuntimeError(f"no Python among {candidates} is executable by uid {uid}")
            _python = found
            if _python != sys.executable:
                log.info(
                    "sandboxed programs run with %s (uid %s cannot run %s)",
                    _python,
                    uid,
                    sys.executable,
                )
        return _python


def _runs_as(uid: int | None, command: list[str]) -> bool:
    _become_subreaper()
    try:
        return (
            subprocess.run(
                command,
                user=uid,
                group=uid,
                extra_groups=[] if uid is not None else None,
                env={"PATH": _SAFE_PATH},
                capture_output=True,
                timeout=30,
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if uid is not None:
            _sweep_uid(uid)


class _workspace:
    """A private base dir (traversable, not listable) with a ``work`` dir owned by ``uid``."""

    def __init__(self, uid: int | None) -> None:
        self.uid = uid

    def __enter__(self) -> tuple[Path, Path]:
        self.base = Path(tempfile.mkdtemp(prefix="sandbox-"))
        self.base.chmod(0o711)
        work = self.base / "work"
        work.mkdir(mode=0o700)
        if self.uid is not None:
            os.chown(work, self.uid, self.uid)
        return work, self.base

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def _set_limits(limits: Limits, nproc: int) -> None:
    """Runs in the child between fork and exec (after the uid switch): lowering is allowed."""
    cpu = limits.cpu_seconds or math.ceil(limits.timeout) + 1
    memory = limits.memory_mb * 2**20
    file_size = limits.file_size_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _processes_of_uid(uid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process owned by ``uid``, zombies included, from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry.path).st_uid != uid:
                continue
            # The state follows the parenthesised command name, which may itself hold spaces.
            state = Path(entry.path, "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        found.append((int(entry.name), state))
    return found


def _pids_of_uid(uid: int) -> list[int]:
    """Live (not zombie) processes owned by ``uid``."""
    return [pid for pid, state in _processes_of_uid(uid) if state not in "ZX"]


def _become_subreaper() -> None:
    """Orphans of sandboxed programs (bwrap's pid-namespace init among them) reparent to this
    process instead of the machine's init, so they are reaped at once rather than left as zombies
    that still count against the private uid's process limit."""
    global _subreaper
    with _SUBREAPER_LOCK:
        if not _subreaper:
            libc = ctypes.CDLL(None, use_errno=True)
            _subreaper = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
            if not _subreaper:
                log.warning("cannot become a child subreaper; sandbox zombies wait for init")


def _kill_everything(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the program's process group, then kill and reap every process of its private uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid is not None:
        _sweep_uid(uid)


def _sweep_uid(uid: int) -> None:
    """Kill and reap what is left of ``uid``: a program can leave its process group (setsid) but
    never its uid."""
    for _ in range(100):
        processes = _processes_of_uid(uid)
        pending = 0
        for pid, state in processes:
            try:
                if state in "ZX":
                    os.waitpid(pid, os.WNOHANG)
                else:
                    os.kill(pid, signal.SIGKILL)
                    pending += 1
            except (ChildProcessError, ProcessLookupError):
                continue  # not our child to reap, or already gone
            pending += state in "ZX"
        if not pending:
            return
        time.sleep(0.01)
    raise RuntimeError(f"sandbox processes of uid {uid} survive SIGKILL: {_pids_of_uid(uid)}")


def _tail(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 4 * _TAIL_CHARS))
        return f.read().decode(errors="replace")[-_TAIL_CHARS:]


def run_program(
    source: str,
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_processes: int = 16,
    file_size_mb: int = 16,
    python: str | None = None,
    use_bwrap: bool | None = None,
) -> ExecResult:
    """Run Python ``source`` contained; passed means exit status 0 within ``timeout`` seconds.

    ``use_bwrap``: None uses bubblewrap when it works here; False runs without it (no network
    namespace); True requires it. ``python`` defaults to this interpreter where the sandbox
    uid can execute it, else the system's ``python3``; it runs isolated (``-I``).
    """
    limits = Limits(
        timeout=timeout,
        memory_mb=memory_mb,
        file_size_mb=file_size_mb,
        max_processes=max_processes,
    )
    if use_bwrap is None:
        use_bwrap = bwrap_available()
    elif use_bwrap and not bwrap_available():
        raise RuntimeError(
            "use_bwrap=True but bwrap fails here; run scripts/install_system_deps.sh"
        )
    _become_subreaper()
    uid = _UIDS.acquire()
    try:
        with _workspace(uid) as (workdir, base):
            program = workdir / "program.py"
            program.write_text(source, encoding="utf-8")
            if uid is not None:
                os.chown(program, uid, uid)
            command = [python or _interpreter(uid), "-I", str(program)]
            if use_bwrap:
                command = _bwrap_command(workdir) + command
            env = {
                "PATH": _SAFE_PATH,
                "HOME": str(workdir),
                "TMPDIR": str(workdir),
                "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1",
                "OMP_NUM_THREADS": "1",
            }
            nproc = limits.max_processes
            if uid is None:
                # RLIMIT_NPROC counts every process of the user, the evaluator's own included.
                nproc += len(_pids_of_uid(os.getuid()))
            out_path, err_path = base / "stdout", base / "stderr"
            start = time.monotonic()
            with out_path.open("wb") as out, err_path.open("wb") as err:
                proc = subprocess.Popen(
                    command,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    user=uid,
                    group=uid,
                    extra_groups=[] if uid is not None else None,
                    preexec_fn=lambda: _set_limits(limits, nproc),
                )
                try:
                    returncode: int | None = proc.wait(timeout=limits.timeout)
                except subprocess.TimeoutExpired:
                    returncode = None
                finally:
                    _kill_everything(proc, uid)
            seconds = time.monotonic() - start
            status = "timeout" if returncode is None else "passed" if returncode == 0 else "failed"
            return ExecResult(
                passed=status == "passed",
                status=status,
                returncode=returncode,
                stdout=_tail(out_path),
                stderr=_tail(err_path),
                seconds=seconds,
            )
    finally:
        _UIDS.release(uid)


def run_many(sources: Sequence[str], *, workers: int = 4, **options: object) -> list[ExecResult]:
    """``run_program`` over ``sources`` with ``workers`` programs at a time, results in order."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_program(source, **options), sources))
