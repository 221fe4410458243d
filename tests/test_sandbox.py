"""Hostile programs stay contained: the evaluator survives and nothing of the program keeps running.

Every hostile test runs with and without bubblewrap (the fallback path); the network test needs
bubblewrap and is skipped where it is unavailable.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import psutil
import pytest

from src.evaluation.sandbox import bwrap_available, run_many, run_program

MODES = [
    pytest.param(True, id="bwrap"),
    pytest.param(False, id="no-bwrap"),
]


@pytest.fixture(params=MODES)
def use_bwrap(request: pytest.FixtureRequest) -> bool:
    if request.param and not bwrap_available():
        pytest.skip("bwrap unavailable here (scripts/install_system_deps.sh)")
    return request.param


def _marked_processes(marker: str) -> list[psutil.Process]:
    """Processes whose command line carries ``marker`` (the program and anything it spawned)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def test_ok_program_passes_and_reports_output(use_bwrap: bool) -> None:
    result = run_program("print(6 * 7)", timeout=10, use_bwrap=use_bwrap)
    assert (result.passed, result.status, result.stdout) == (True, "passed", "42\n")


def test_failing_program_fails(use_bwrap: bool) -> None:
    result = run_program("assert 1 == 2, 'nope'", timeout=10, use_bwrap=use_bwrap)
    assert result.status == "failed" and "AssertionError: nope" in result.stderr


def test_infinite_loop_times_out(use_bwrap: bool) -> None:
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout=1.0, use_bwrap=use_bwrap)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 5


def test_memory_hog_is_refused(use_bwrap: bool) -> None:
    source = "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 2**20))\n"
    result = run_program(source, timeout=10, memory_mb=256, use_bwrap=use_bwrap)
    assert result.status == "failed" and "MemoryError" in result.stderr


def test_child_processes_are_capped_and_killed(use_bwrap: bool) -> None:
    marker = f"sandbox-child-{os.getpid()}-{use_bwrap}"
    # 200 sleeping children at most (bounded, never a fork bomb); the limit of 8 stops it early.
    source = f"""
import subprocess, sys
SLEEP = "import time; time.sleep(60)"
started = 0
for _ in range(200):
    try:
        subprocess.Popen([sys.executable, "-c", SLEEP, "{marker}"], start_new_session=True)
        started += 1
    except OSError:
        break
print(started)
sys.exit(0 if started == 200 else 3)
"""
    result = run_program(source, timeout=10, max_processes=8, use_bwrap=use_bwrap)
    assert result.status == "failed", result
    assert 0 < int(result.stdout) < 8  # some spawns succeed, then the limit bites
    assert _marked_processes(marker) == []


def test_write_outside_workdir_fails(use_bwrap: bool, tmp_path: Path) -> None:
    target = tmp_path / "outside.txt"
    tmp_path.chmod(0o777)  # world-writable: only the sandbox itself can stop the write
    source = f"open({str(target)!r}, 'w').write('pwned')\nopen('inside.txt', 'w').write('ok')\n"
    result = run_program(source, timeout=10, use_bwrap=use_bwrap)
    if use_bwrap or os.geteuid() == 0:
        assert result.status == "failed" and not target.exists()
    else:
        pytest.skip("without bwrap or root there is no filesystem isolation to test")


def test_workdir_is_writable_and_fresh(use_bwrap: bool) -> None:
    source = "import os\nassert os.listdir('.') == ['program.py'], os.listdir('.')\nopen('x','w')"
    assert run_program(source, timeout=10, use_bwrap=use_bwrap).passed


def test_loopback_connection_fails() -> None:
    if not bwrap_available():
        pytest.skip("no network namespace without bwrap")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        source = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        result = run_program(source, timeout=10)
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):
            server.accept()
    assert result.status == "failed" and "ConnectionRefusedError" in result.stderr


def test_killing_parent_and_evaluator_fails(use_bwrap: bool) -> None:
    if not use_bwrap and os.geteuid() != 0:
        pytest.skip("without bwrap or root the program shares the evaluator's uid")
    source = f"""
import os, signal
for pid in (os.getppid(), {os.getpid()}):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""
    result = run_program(source, timeout=10, use_bwrap=use_bwrap)
    assert result.status == "passed"  # the program ran to its end; we are still here to check


def test_secret_environment_is_scrubbed(use_bwrap: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_fake_secret_123")
    source = """
import os, pathlib
assert "HF_TOKEN" not in os.environ
for environ in pathlib.Path("/proc").glob("*/environ"):
    try:
        assert b"hf_fake_secret_123" not in environ.read_bytes(), environ
    except OSError:
        pass
"""
    result = run_program(source, timeout=20, use_bwrap=use_bwrap)
    assert result.passed, result.stderr


def test_escaping_the_process_group_is_still_killed(use_bwrap: bool) -> None:
    if not use_bwrap and os.geteuid() != 0:
        pytest.skip("without bwrap or root only the process group is killed")
    marker = f"sandbox-daemon-{os.getpid()}-{use_bwrap}"
    source = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'],"
        " start_new_session=True)\n"
    )
    assert run_program(source, timeout=10, use_bwrap=use_bwrap).passed
    assert _marked_processes(marker) == []


def test_run_many_keeps_order() -> None:
    results = run_many([f"print({i})" for i in range(6)], workers=3, timeout=10)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]


def test_bad_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="timeout"):
        run_program("pass", timeout=0)
    with pytest.raises(ValueError, match="workers"):
        run_many(["pass"], workers=0)
