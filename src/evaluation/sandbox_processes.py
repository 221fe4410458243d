"""The sandbox's process bookkeeping: private uids for programs, and killing what they leave.

When the evaluator runs as root, each program runs as a private, otherwise unused uid
(``RLIMIT_NPROC`` is not enforced for root, and a separate uid can neither signal the evaluator
nor write its files); after the run every process left with that uid is killed and reaped, and
the evaluator is a child subreaper so that orphans of programs are reaped here at once. Under
bwrap, the pid namespace is torn down from its init so that bwrap itself reaps it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Private uids: a block per evaluator process so concurrent evaluators never share one (the
# after-run sweep kills every process of a uid). Far above the range of real accounts.
_UID_BASE = 1_000_000
_UIDS_PER_PROCESS = 256
_PR_SET_CHILD_SUBREAPER = 36


class UidPool:
    """Hands out private uids, one per running program, when the evaluator is root."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._next = 0

    def acquire(self) -> int | None:
        """A private uid, or None when the evaluator is not root (programs keep its uid)."""
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


UIDS = UidPool()
_SUBREAPER_LOCK = threading.Lock()
_subreaper = False


def processes_of_uid(uid: int) -> list[tuple[int, str]]:
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


def pids_of_uid(uid: int) -> list[int]:
    """Live (not zombie) processes owned by ``uid``."""
    return [pid for pid, state in processes_of_uid(uid) if state not in "ZX"]


def tasks_of_uid(uid: int) -> int:
    """What ``RLIMIT_NPROC`` counts for ``uid``: its threads, zombies included."""
    total = 0
    for pid, _ in processes_of_uid(uid):
        try:
            total += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            total += 1  # gone, or a zombie being reaped: counted until it is
    return total


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                # After the parenthesised command name: state, then the parent's pid.
                parent = int(Path(entry.path, "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def become_subreaper() -> None:
    """As root: orphans of sandboxed programs reparent to this process instead of the machine's
    init, so ``sweep_uid`` reaps them at once rather than leaving zombies that still count against
    the private uid's process limit. A non-root evaluator has no such sweep (programs share its
    uid), so there orphans are left to init rather than pile up here unreaped."""
    global _subreaper
    if os.geteuid() != 0:
        return
    with _SUBREAPER_LOCK:
        if not _subreaper:
            libc = ctypes.CDLL(None, use_errno=True)
            _subreaper = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
            if not _subreaper:
                log.warning("cannot become a child subreaper; sandbox zombies wait for init")


def kill_everything(proc: subprocess.Popen, uid: int | None, bwrap: bool) -> None:
    """Kill the program's process group, then kill and reap every process of its private uid.

    Under bwrap, first its pid-namespace init (bwrap's only child): the kernel then kills and
    reaps everything in the namespace, and bwrap reaps the init and exits, so nothing is left
    for init or this process to reap (killing bwrap first would orphan its init)."""
    if bwrap and proc.poll() is None:  # still running: its pid is not yet free for reuse
        for child in _children_of(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # the process group kill below
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid is not None:
        sweep_uid(uid)


def sweep_uid(uid: int) -> None:
    """Kill and reap what is left of ``uid``: a program can leave its process group (setsid) but
    never its uid."""
    for _ in range(100):
        processes = processes_of_uid(uid)
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
    raise RuntimeError(f"sandbox processes of uid {uid} survive SIGKILL: {pids_of_uid(uid)}")
