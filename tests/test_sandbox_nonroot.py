"""The sandbox for a non-root evaluator: bubblewrap through an unprivileged user namespace.

As root, the test starts an evaluator as ``nobody`` (uid 65534); otherwise the evaluator runs
as the test's own user. That evaluator imports ``src.evaluation.sandbox`` (standard library
only, so the system's Python will do where ours is not executable by ``nobody``), runs hostile
programs and reports what happened as JSON; the test checks the host side. Then, with
bubblewrap hidden, the same evaluator must run nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
SECRET = "hf_fake_secret_789"

# The evaluator: argv = repo root, {name: source} as JSON. Prints {name: outcome} as JSON.
EVALUATOR = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from src.evaluation.sandbox import SandboxUnavailable, bwrap_problem, run_program
report = {"uid": os.getuid(), "bwrap_problem": bwrap_problem()}
for name, source in json.loads(sys.argv[2]).items():
    source = source.replace("EVALUATOR_PID", str(os.getpid()))
    try:
        r = run_program(source, timeout=3, max_processes=8)
        report[name] = {"status": r.status, "stdout": r.stdout, "stderr": r.stderr[-600:]}
    except SandboxUnavailable as error:
        report[name] = {"refused": str(error)}
print(json.dumps(report))
"""


def _as_user() -> dict[str, object]:
    """subprocess options that run as ``nobody`` when we are root (else as ourselves)."""
    if os.geteuid() != 0:
        return {}
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []}


def _python_for_evaluator() -> str:
    """A Python the non-root evaluator can run and import the sandbox with, else skip."""
    importing = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import src.evaluation.sandbox"
    reasons = []
    for python in (sys.executable, shutil.which("python3", path=SAFE_PATH)):
        if python is None:
            continue
        try:
            done = subprocess.run(
                [python, "-c", importing],
                cwd="/",
                env={"PATH": SAFE_PATH, "PYTHONDONTWRITEBYTECODE": "1"},
                capture_output=True,
                text=True,
                timeout=60,
                **_as_user(),
            )
        except OSError as error:
            reasons.append(f"{python}: {error}")
            continue
        if done.returncode == 0:
            return python
        reasons.append(f"{python}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    pytest.skip(f"no Python can import the sandbox as a non-root user: {'; '.join(reasons)}")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-writable directory outside the sandbox, in /var/tmp: pytest's tmp_path is private
    to root, and under bwrap the host's /tmp is not even visible (a write would fail for that)."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-nonroot-", dir="/var/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _evaluate(python: str, programs: dict[str, str], **env: str) -> dict:
    done = subprocess.run(
        [python, "-c", EVALUATOR, str(ROOT), json.dumps(programs)],
        cwd="/",
        env={"PATH": SAFE_PATH, "PYTHONDONTWRITEBYTECODE": "1", "HF_TOKEN": SECRET, **env},
        capture_output=True,
        text=True,
        timeout=120,
        **_as_user(),
    )
    assert done.returncode == 0, done.stderr[-3000:]  # the evaluator survived its programs
    return json.loads(done.stdout.strip().splitlines()[-1])


def _marked_processes(marker: str) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline", "status"])
        if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE
    ]


def _programs(shared: Path, host_tmp: Path, port: int, marker: str) -> dict[str, str]:
    return {
        "ok": "print(6 * 7)",
        "write_outside": f"open({str(shared / 'outside.txt')!r}, 'w').write('pwned')",
        "write_host_tmp": f"open({str(host_tmp)!r}, 'w').write('pwned')",
        "loopback": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
        "kill_parent": (
            "import os, signal\n"
            "for pid in (os.getppid(), EVALUATOR_PID):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
        ),
        "secret": (
            "import os, pathlib\n"
            f"assert {SECRET!r} not in str(os.environ)\n"
            "for environ in pathlib.Path('/proc').glob('*/environ'):\n"
            "    try:\n"
            f"        assert {SECRET.encode()!r} not in environ.read_bytes(), environ\n"
            "    except OSError:\n        pass\n"
        ),
        "fork_bomb": (
            "import os, sys\n"
            f"if {marker!r} not in sys.argv:\n"
            f"    os.execv(sys.executable, [sys.executable, '-I', __file__, {marker!r}])\n"
            "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
        ),
        "loop": "while True:\n    pass",
    }


def test_nonroot_evaluator_contains_hostile_programs(shared_dir: Path) -> None:
    python = _python_for_evaluator()
    host_tmp = Path("/tmp") / f"nonroot-escape-{os.getpid()}-{time.monotonic_ns()}"
    marker = f"nonroot-bomb-{os.getpid()}"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        programs = _programs(shared_dir, host_tmp, server.getsockname()[1], marker)
        try:
            report = _evaluate(python, programs)
        finally:
            host_tmp.unlink(missing_ok=True)
            for process in _marked_processes(marker):
                process.kill()
        if report["bwrap_problem"] is not None:
            pytest.skip(f"bubblewrap fails for a non-root user here: {report['bwrap_problem']}")
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):
            server.accept()  # nothing connected
    assert report["uid"] == (NOBODY if os.geteuid() == 0 else os.getuid())
    status = {name: outcome["status"] for name, outcome in report.items() if name in programs}
    assert status == {
        "ok": "passed",  # programs do run, so the outcomes below are the sandbox's doing
        "write_outside": "failed",
        "write_host_tmp": "passed",  # into its private /tmp, not the host's
        "loopback": "failed",
        "kill_parent": "passed",  # ran to its end; its evaluator survived to report
        "secret": "passed",
        "fork_bomb": "timeout",
        "loop": "timeout",
    }, report
    assert report["ok"]["stdout"] == "42\n"
    assert "ConnectionRefusedError" in report["loopback"]["stderr"]
    assert "Read-only file system" in report["write_outside"]["stderr"]
    assert not (shared_dir / "outside.txt").exists()
    assert not host_tmp.exists()
    assert _marked_processes(marker) == []


def test_nonroot_evaluator_without_bwrap_runs_nothing(shared_dir: Path) -> None:
    python = _python_for_evaluator()
    written = shared_dir / "ran.txt"
    programs = {"ok": "print(1)", "write": f"open({str(written)!r}, 'w').write('ran')"}
    report = _evaluate(python, programs, SANDBOX_BWRAP="/nonexistent/bwrap")
    assert "is not found" in report["bwrap_problem"]
    for name in programs:
        assert "apt-get install bubblewrap" in report[name].get("refused", ""), report
    assert not written.exists()
