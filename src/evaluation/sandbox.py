"""Run untrusted, model-written Python programs in a contained subprocess.

Each program gets:

- a fresh temporary working directory (removed afterwards) and a scrubbed environment;
- resource limits set with ``resource.setrlimit`` in the child before exec: address space,
  CPU seconds, file size, open files and process count;
- its own session / process group, killed as a whole at the end, plus a wall-clock timeout;
- when the evaluator runs as root: a private, otherwise unused uid, and every process left with
  that uid is killed after the run (``src.evaluation.sandbox_processes``);
- bubblewrap (``bwrap``): a network namespace (no network, not even loopback), a pid namespace,
  and a read-only view of the filesystem except the working directory and an empty private
  ``/tmp``. It runs as an unprivileged user through a user namespace, so it works for a
  non-root evaluator too.

The sandbox fails closed: where bwrap is missing or fails its probe, ``run_program`` and
``run_many`` raise ``SandboxUnavailable`` (naming how to install it) and run nothing, unless
the caller passes ``allow_unconfined=True``; then programs run with only the limits above (with
network access and the filesystem the uid can write), and one loud warning is logged.
``SANDBOX_BWRAP`` names the bwrap executable (default: ``bwrap`` on ``PATH``); the probe is
cached per value, so tests can hide bubblewrap with ``SANDBOX_BWRAP=/nonexistent``.

This module and ``sandbox_processes`` import only the standard library, so any Python can run
them (the non-root test runs them with the system's).

Usage::

    from src.evaluation.sandbox import run_program, run_many
    result = run_program("print(1 + 1)", timeout=5.0)
    result.passed, result.status, result.stdout  # (True, "passed", "2\\n")
    results = run_many([src_a, src_b], workers=4, timeout=10.0)
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from src.evaluation.sandbox_processes import (
    UIDS,
    become_subreaper,
    kill_everything,
    sweep_uid,
    tasks_of_uid,
)

log = logging.getLogger(__name__)

_TAIL_CHARS = 2000
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
BWRAP_ENV = "SANDBOX_BWRAP"
INSTALL_HINT = "install it (apt-get install bubblewrap, or bash scripts/install_system_deps.sh)"


class SandboxUnavailable(RuntimeError):
    """No working bubblewrap and no ``allow_unconfined``: nothing was run."""


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


@dataclass(frozen=True)
class _Probe:
    """The bwrap executable that works here, else (``path`` None) why not, in one line."""

    path: str | None
    problem: str | None


# Keyed by $SANDBOX_BWRAP (None: unset), so a changed setting is probed afresh.
_PROBE_LOCK = threading.Lock()
_probes: dict[str | None, _Probe] = {}
_UNCONFINED_LOCK = threading.Lock()
_warned_unconfined = False
_PYTHON_LOCK = threading.Lock()
_python: str | None = None


def _bwrap_command(bwrap: str, workdir: Path) -> list[str]:
    """bwrap prefix: no network, own pid namespace, read-only root, writable ``workdir`` only."""
    return [
        bwrap,
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


def _probe() -> _Probe:
    setting = os.environ.get(BWRAP_ENV)
    with _PROBE_LOCK:
        if setting not in _probes:
            _probes[setting] = _probe_bwrap(setting)
        return _probes[setting]


def bwrap_problem() -> str | None:
    """Why bubblewrap cannot confine programs here (one line), or None when it can."""
    return _probe().problem


def bwrap_available() -> bool:
    """Whether bubblewrap runs here with our flags (probed once per ``SANDBOX_BWRAP`` value)."""
    return bwrap_problem() is None


def _probe_bwrap(setting: str | None) -> _Probe:
    if setting is None:
        path = shutil.which("bwrap") or shutil.which("bwrap", path=_SAFE_PATH)
        if path is None:
            return _Probe(None, "is not installed (no bwrap on PATH)")
    else:
        path = shutil.which(setting) if setting else None
        if path is None:
            return _Probe(None, f"is not found ({BWRAP_ENV}={setting!r})")
    # Probe as the uid programs will run as: bwrap must work for it, not just for us.
    uid = UIDS.acquire()
    try:
        with _workspace(uid) as (workdir, _):
            error = _run_as(uid, [*_bwrap_command(path, workdir), "true"])
    finally:
        UIDS.release(uid)
    if error is not None:
        # Installed but failing: usually no user namespaces for unprivileged users (a container
        # without them, or a sysctl such as user.max_user_namespaces=0).
        return _Probe(None, f"({path}) fails here: {error} (it needs unprivileged user namespaces)")
    return _Probe(path, None)


def confinement(allow_unconfined: bool = False, *, opt_in: str = "allow_unconfined=True") -> str:
    """How programs run here: "bubblewrap" when it works; else "unconfined" when
    ``allow_unconfined`` (with one loud warning per process); else ``SandboxUnavailable``, whose
    one-line message says how to install bubblewrap and names ``opt_in``."""
    return "bubblewrap" if _bwrap_or_none(allow_unconfined, opt_in) else "unconfined"


def _bwrap_or_none(allow_unconfined: bool, opt_in: str) -> str | None:
    """``confinement``'s decision: the bwrap to run programs under, or None for unconfined."""
    global _warned_unconfined
    # A truthy string such as "false" from a hand-built config must not open the sandbox.
    if not isinstance(allow_unconfined, bool):
        raise TypeError(f"allow_unconfined must be a bool, got {allow_unconfined!r}")
    probe = _probe()
    if probe.problem is None:
        return probe.path
    problem = probe.problem
    if not allow_unconfined:
        raise SandboxUnavailable(
            f"refusing to run model-written code: bubblewrap {problem}; {INSTALL_HINT}, or set "
            f"{opt_in} to run it UNCONFINED (with network access and a writable filesystem)"
        )
    with _UNCONFINED_LOCK:
        if not _warned_unconfined:
            _warned_unconfined = True
            log.warning(
                "!!! RUNNING MODEL-WRITTEN CODE UNCONFINED (%s): bubblewrap %s; programs have "
                "network access and can write wherever their uid can; %s !!!",
                opt_in,
                problem,
                INSTALL_HINT,
            )
    return None


def _interpreter(uid: int | None) -> str:
    """A Python the sandbox uid can execute: this one, else the system's (probed once)."""
    global _python
    with _PYTHON_LOCK:
        if _python is None:
            candidates = [sys.executable, shutil.which("python3", path=_SAFE_PATH)]
            found = next(
                (c for c in candidates if c and _run_as(uid, [c, "-I", "-c", ""]) is None), None
            )
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


def _run_as(uid: int | None, command: list[str]) -> str | None:
    """Run ``command`` as ``uid``; None when it exits 0, else why not (one line)."""
    become_subreaper()
    try:
        done = subprocess.run(
            command,
            user=uid,
            group=uid,
            extra_groups=[] if uid is not None else None,
            env={"PATH": _SAFE_PATH},
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as error:
        return str(error).replace("\n", " ")
    finally:
        if uid is not None:
            sweep_uid(uid)
    if done.returncode == 0:
        return None
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else f"exit status {done.returncode}"


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
    allow_unconfined: bool = False,
) -> ExecResult:
    """Run Python ``source`` contained; passed means exit status 0 within ``timeout`` seconds.

    Under bubblewrap, or raises ``SandboxUnavailable`` before running anything where it does not
    work, unless ``allow_unconfined`` (then without it, warned). ``python`` defaults to this
    interpreter where the sandbox uid can execute it, else the system's ``python3``; it runs
    isolated (``-I``).
    """
    limits = Limits(
        timeout=timeout,
        memory_mb=memory_mb,
        file_size_mb=file_size_mb,
        max_processes=max_processes,
    )
    bwrap = _bwrap_or_none(allow_unconfined, "allow_unconfined=True")
    become_subreaper()
    uid = UIDS.acquire()
    try:
        with _workspace(uid) as (workdir, base):
            program = workdir / "program.py"
            program.write_text(source, encoding="utf-8")
            if uid is not None:
                os.chown(program, uid, uid)
            command = [python or _interpreter(uid), "-I", str(program)]
            if bwrap is not None:
                command = _bwrap_command(bwrap, workdir) + command
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
                # RLIMIT_NPROC counts every thread of the user (zombies too), the evaluator's own
                # included: the limit is on top of those.
                nproc += tasks_of_uid(os.getuid())
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
                    kill_everything(proc, uid, bwrap=bwrap is not None)
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
        UIDS.release(uid)


def run_many(
    sources: Sequence[str],
    *,
    workers: int = 4,
    allow_unconfined: bool = False,
    **options: object,
) -> list[ExecResult]:
    """``run_program`` over ``sources`` with ``workers`` programs at a time, results in order;
    refuses (``SandboxUnavailable``) once, before any program runs, where bubblewrap fails."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    confinement(allow_unconfined)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            pool.map(
                lambda source: run_program(source, allow_unconfined=allow_unconfined, **options),
                sources,
            )
        )
