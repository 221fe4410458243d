"""Hostile programs stay contained: the evaluator survives and nothing of the program keeps running.

Every hostile test runs under bubblewrap and, opted in, unconfined (bubblewrap hidden through
``SANDBOX_BWRAP``, a real setting of the sandbox): the limits, private uid and process kill hold
in both. What needs bubblewrap (network, the host's filesystem) is tested under it, directly and
through HumanEval's scoring. With bubblewrap hidden or broken and no opt-in, nothing runs.
A non-root evaluator: tests/test_sandbox_nonroot.py.
"""

from __future__ import annotations

import logging
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

from src.evaluation import sandbox
from src.evaluation.benchmarks import get
from src.evaluation.benchmarks.code import HumanEval
from src.evaluation.sandbox import (
    BWRAP_ENV,
    SandboxUnavailable,
    bwrap_available,
    run_many,
    run_program,
)

MODES = [
    pytest.param(True, id="bwrap"),
    pytest.param(False, id="unconfined"),
]


@pytest.fixture(params=MODES)
def confined(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """True: under bubblewrap. False: bubblewrap hidden, ``allow_unconfined`` passed (opts())."""
    if request.param and not bwrap_available():
        pytest.skip("bwrap unavailable here (scripts/install_system_deps.sh)")
    if not request.param:
        monkeypatch.setenv(BWRAP_ENV, "/nonexistent/bwrap")
    return request.param


def opts(confined: bool) -> dict[str, bool]:
    return {} if confined else {"allow_unconfined": True}


@pytest.fixture
def needs_bwrap() -> None:
    if not bwrap_available():
        pytest.skip("bwrap unavailable here (scripts/install_system_deps.sh)")


def _marked_processes(marker: str) -> list[psutil.Process]:
    """Processes whose command line carries ``marker`` (the program and anything it spawned)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _fork_bomb(marker: str) -> str:
    """A real fork bomb; it re-executes itself once so that every copy carries ``marker``."""
    return f"""
import os, sys
if {marker!r} not in sys.argv:
    os.execv(sys.executable, [sys.executable, "-I", __file__, {marker!r}])
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


@pytest.fixture
def outside() -> Iterator[Path]:
    """A world-writable directory (only the sandbox itself can stop a write there) in /var/tmp:
    under bwrap the host's /tmp, where pytest's tmp_path is, is not even visible."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-outside-", dir="/var/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_ok_program_passes_and_reports_output(confined: bool) -> None:
    result = run_program("print(6 * 7)", timeout=10, **opts(confined))
    assert (result.passed, result.status, result.stdout) == (True, "passed", "42\n")


def test_failing_program_fails(confined: bool) -> None:
    result = run_program("assert 1 == 2, 'nope'", timeout=10, **opts(confined))
    assert result.status == "failed" and "AssertionError: nope" in result.stderr


def test_infinite_loop_times_out(confined: bool) -> None:
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout=1.0, **opts(confined))
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 5


def test_memory_hog_is_refused(confined: bool) -> None:
    source = "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 2**20))\n"
    result = run_program(source, timeout=10, memory_mb=256, **opts(confined))
    assert result.status == "failed" and "MemoryError" in result.stderr


def test_child_processes_are_capped_and_killed(confined: bool) -> None:
    marker = f"sandbox-child-{os.getpid()}-{confined}"
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
    result = run_program(source, timeout=10, max_processes=8, **opts(confined))
    assert result.status == "failed", result
    assert 0 < int(result.stdout) < 8  # some spawns succeed, then the limit bites
    assert _marked_processes(marker) == []


def test_fork_bomb_is_capped_and_killed(confined: bool) -> None:
    if not confined and os.geteuid() != 0:
        pytest.skip("unconfined and not root, the bomb shares the evaluator's process limit")
    marker = f"sandbox-bomb-{os.getpid()}-{confined}"
    start = time.monotonic()
    result = run_program(_fork_bomb(marker), timeout=2.0, max_processes=8, **opts(confined))
    assert result.status == "timeout" and time.monotonic() - start < 10
    assert _marked_processes(marker) == []
    # The evaluator's own user can still start processes.
    assert subprocess.run([sys.executable, "-c", "pass"], timeout=30).returncode == 0


def test_write_to_the_evaluators_files_fails(confined: bool, tmp_path: Path) -> None:
    if not confined and os.geteuid() != 0:
        pytest.skip("unconfined and not root the program shares the evaluator's uid and files")
    target = tmp_path / "outside.txt"  # the evaluator's: pytest's tmp dirs are private to it
    source = f"open({str(target)!r}, 'w').write('pwned')\nopen('inside.txt', 'w').write('ok')\n"
    result = run_program(source, timeout=10, **opts(confined))
    assert result.status == "failed" and not target.exists()


def test_write_to_a_world_writable_dir_fails(needs_bwrap: None, outside: Path) -> None:
    # What only bwrap stops: unconfined, even a private uid may write here.
    target = outside / "outside.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('pwned')\n", timeout=10)
    assert result.status == "failed" and "Read-only file system" in result.stderr
    assert not target.exists()


def test_write_to_host_tmp_is_not_seen(needs_bwrap: None) -> None:
    # The reported escape: a program wrote to the host's /tmp. Under bwrap /tmp is private.
    target = Path("/tmp") / f"sandbox-escape-{os.getpid()}-{time.monotonic_ns()}"
    try:
        result = run_program(f"open({str(target)!r}, 'w').write('pwned')\n", timeout=10)
        assert result.passed, result.stderr  # it wrote, but into its own /tmp
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_workdir_is_writable_and_fresh(confined: bool) -> None:
    source = "import os\nassert os.listdir('.') == ['program.py'], os.listdir('.')\nopen('x','w')"
    assert run_program(source, timeout=10, **opts(confined)).passed


def test_loopback_connection_fails(needs_bwrap: None) -> None:
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


def test_killing_parent_and_evaluator_fails(confined: bool) -> None:
    if not confined and os.geteuid() != 0:
        pytest.skip("unconfined and not root the program shares the evaluator's uid")
    source = f"""
import os, signal
for pid in (os.getppid(), {os.getpid()}):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""
    result = run_program(source, timeout=10, **opts(confined))
    assert result.status == "passed"  # the program ran to its end; we are still here to check


def test_secret_environment_is_scrubbed(confined: bool, monkeypatch: pytest.MonkeyPatch) -> None:
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
    result = run_program(source, timeout=20, **opts(confined))
    assert result.passed, result.stderr


def test_escaping_the_process_group_is_still_killed(confined: bool) -> None:
    if not confined and os.geteuid() != 0:
        pytest.skip("unconfined and not root only the process group is killed")
    marker = f"sandbox-daemon-{os.getpid()}-{confined}"
    source = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'],"
        " start_new_session=True)\n"
    )
    assert run_program(source, timeout=10, **opts(confined)).passed
    assert _marked_processes(marker) == []


def test_run_many_keeps_order(confined: bool) -> None:
    results = run_many([f"print({i})" for i in range(6)], workers=3, timeout=10, **opts(confined))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]


def test_bad_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="timeout"):
        run_program("pass", timeout=0)
    with pytest.raises(ValueError, match="workers"):
        run_many(["pass"], workers=0)


# --- fails closed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bwrap", "problem"),
    [
        pytest.param("/nonexistent/bwrap", "is not found", id="missing"),
        pytest.param("/bin/false", "fails here: exit status 1", id="fails-its-probe"),
    ],
)
def test_without_working_bwrap_nothing_runs(
    bwrap: str, problem: str, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BWRAP_ENV, bwrap)
    marker = outside / "ran.txt"
    source = f"open({str(marker)!r}, 'w').write('ran')\n"
    with pytest.raises(SandboxUnavailable) as error:
        run_program(source, timeout=10)
    message = str(error.value)
    assert "\n" not in message and problem in message
    assert "apt-get install bubblewrap" in message and "allow_unconfined=True" in message
    with pytest.raises(SandboxUnavailable):
        run_many([source] * 3, workers=2, timeout=10)
    assert not marker.exists()


def test_unconfined_opt_in_warns_loudly_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(BWRAP_ENV, "/nonexistent/bwrap")
    monkeypatch.setattr(sandbox, "_warned_unconfined", False)  # earlier tests warned already
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        assert run_program("print(1)", timeout=10, allow_unconfined=True).passed
        assert run_many(["print(2)"] * 2, timeout=10, allow_unconfined=True)[1].passed
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "RUNNING MODEL-WRITTEN CODE UNCONFINED" in warnings[0]


def test_opt_in_must_be_a_bool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BWRAP_ENV, "/nonexistent/bwrap")
    with pytest.raises(TypeError, match="must be a bool"):
        run_program("pass", allow_unconfined="false")  # type: ignore[arg-type]


# --- HumanEval's hostile programs, scored through the benchmark -------------------------------


@pytest.fixture(scope="module")
def humaneval_problem() -> dict:
    return get("humaneval", limit=1).load()[0]


def _hostile(problem: dict, code: str) -> str:
    """A chat response: ``code`` at import time, then a correct solution (so passing means the
    hostile part ran to its end)."""
    return f"```python\n{code}\n{problem['prompt']}{problem['canonical_solution']}```"


def _score(problem: dict, code: str, **options: object) -> bool:
    return HumanEval(timeout=3.0, **options).score(problem, _hostile(problem, code))


def test_humaneval_control_passes(needs_bwrap: None, humaneval_problem: dict) -> None:
    assert _score(humaneval_problem, "pass")  # so the failures below are the hostile code's


def test_humaneval_loop_times_out(needs_bwrap: None, humaneval_problem: dict) -> None:
    start = time.monotonic()
    assert not _score(humaneval_problem, "while True:\n    pass")
    assert time.monotonic() - start < 10


def test_humaneval_fork_bomb_is_killed(needs_bwrap: None, humaneval_problem: dict) -> None:
    marker = f"humaneval-bomb-{os.getpid()}"
    assert not _score(humaneval_problem, _fork_bomb(marker))
    assert _marked_processes(marker) == []


def test_humaneval_writes_outside_are_not_seen(
    needs_bwrap: None, humaneval_problem: dict, outside: Path
) -> None:
    host_tmp = Path("/tmp") / f"humaneval-escape-{os.getpid()}-{time.monotonic_ns()}"
    target = outside / "outside.txt"
    code = f"open({str(host_tmp)!r}, 'w').write('x')\nopen({str(target)!r}, 'w').write('x')"
    try:
        assert not _score(humaneval_problem, code)  # the second write is refused
        assert not host_tmp.exists() and not target.exists()
    finally:
        host_tmp.unlink(missing_ok=True)


def test_humaneval_loopback_connect_fails(needs_bwrap: None, humaneval_problem: dict) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
        assert not _score(humaneval_problem, code)
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):
            server.accept()


def test_humaneval_killing_the_parent_fails(needs_bwrap: None, humaneval_problem: dict) -> None:
    code = f"""
import os, signal
for pid in (os.getppid(), {os.getpid()}):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""
    assert _score(humaneval_problem, code)  # it tried, ran to its end, and we are still here


def test_humaneval_cannot_read_an_environment_secret(
    needs_bwrap: None, humaneval_problem: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_fake_secret_456")
    code = """
import os, pathlib
leaks = [k for k, v in os.environ.items() if "hf_fake_secret_456" in v]
for environ in pathlib.Path("/proc").glob("*/environ"):
    try:
        if b"hf_fake_secret_456" in environ.read_bytes():
            leaks.append(str(environ))
    except OSError:
        pass
assert not leaks, leaks
"""
    assert _score(humaneval_problem, code)  # passing: it looked everywhere and found nothing


def test_humaneval_without_bwrap_runs_nothing(
    humaneval_problem: dict, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BWRAP_ENV, "/nonexistent/bwrap")
    marker = outside / "ran.txt"
    bench = HumanEval(timeout=3.0)
    with pytest.raises(ValueError, match="apt-get install bubblewrap"):
        bench.check()
    with pytest.raises(SandboxUnavailable):
        bench.score(humaneval_problem, _hostile(humaneval_problem, f"open({str(marker)!r}, 'w')"))
    assert not marker.exists()
