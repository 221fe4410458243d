"""Outputs written whole or not at all: into a temporary sibling, moved into place when complete.

A reader (a later run, `src.eval`, another experiment starting from an export) sees the previous
version or the new one, never a mix, and a write that fails part-way (a full disk, a file-size
limit, a kill) leaves the previous version as it was. A full disk is one `ConfigError` line
naming the folder, the bytes needed and the bytes free.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

from src.config.errors import ConfigError

log = logging.getLogger(__name__)

# Write failures that mean "no room", with what to say about them.
NO_ROOM = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this filesystem or process limit",
}
# How a Rust writer (safetensors) reports an OS error in its message: "... (os error 27)", or
# in older versions `IoError(Os { code: 28, ... })`.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem of `path` (or of its nearest existing parent)."""
    existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
    return shutil.disk_usage(existing).free


def _gib(n: int) -> str:
    if n >= 2**28:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def check_space(path: str | Path, needed: int, what: str) -> None:
    """ConfigError unless the filesystem of `path` has `needed` bytes free: said before the
    work, not after it filled the disk."""
    free = free_bytes(path)
    if free < needed:
        raise ConfigError(
            f"cannot write {what} to {path}: {_gib(needed)} needed, {_gib(free)} free there: "
            "free some space, or write it elsewhere"
        )


def no_room(error: BaseException) -> str | None:
    """What a write failure means when it is a lack of room (full disk, quota, file-size
    limit), else None; also for errors that only carry the OS error in their message."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_ROOM:
            return NO_ROOM[seen.errno]
        match = _RUST_OS_ERROR.search(str(seen))
        if match and int(code := match.group(1) or match.group(2)) in NO_ROOM:
            return NO_ROOM[int(code)]
        seen = seen.__cause__ or seen.__context__
    return None


def _sibling(target: Path, kind: str, pid: int, stem: str, suffix: str) -> Path:
    """`<stem>.<kind>-<host>-<pid><suffix>` beside `target`: the host and PID of its writer."""
    return target.with_name(f"{stem}.{kind}-{socket.gethostname()}-{pid}{suffix}")


def _clear_leftovers(target: Path, stem: str, suffix: str = "") -> None:
    """Remove what writers of `target` on this host left when they were killed (their
    process is gone): a temporary copy is deleted; a previous version moved aside is put back
    when `target` is missing (killed between the two renames), else deleted."""
    pattern = re.compile(
        rf"{re.escape(stem)}\.(tmp|old)-{re.escape(socket.gethostname())}-(\d+){re.escape(suffix)}"
    )
    for sibling in sorted(target.parent.iterdir(), key=lambda p: ".old-" not in p.name):
        found = pattern.fullmatch(sibling.name)
        if found is None or _running(int(found.group(2))):
            continue
        if found.group(1) == "old" and not target.exists():
            os.rename(sibling, target)
            log.warning("%s: put back the version a killed write had moved aside", target)
            continue
        shutil.rmtree(sibling) if sibling.is_dir() else sibling.unlink()
        log.warning("%s: removed, left by a write that was killed", sibling)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _failed(error: BaseException, what: str, path: Path, needed: int | None) -> None:
    """Re-raise a lack of room as one ConfigError line (the previous version is kept)."""
    reason = no_room(error)
    if reason is None:
        return
    size = f"{_gib(needed)} needed, " if needed else ""
    raise ConfigError(
        f"cannot write {what} to {path}: {reason} ({size}{_gib(free_bytes(path))} free there); "
        f"{'the previous version is kept' if path.exists() else 'nothing was written'}: free "
        "some space, or write it elsewhere"
    ) from None


@contextlib.contextmanager
def atomic_folder(
    path: str | Path, *, what: str = "the output", needed: int | None = None
) -> Iterator[Path]:
    """Yield `<path>.tmp-<host>-<pid>` to fill; when the block ends without error, it replaces
    `path`: the old folder is moved aside, the new one moved in, then the old one deleted
    (renames within one folder: a reader sees the old folder or the new one, never a
    half-written one; only for the instant between the two renames, none). On an error the
    temporary folder is removed and `path` is untouched; a killed process leaves its
    temporary folder beside `path`, never a mix in it, and the next write there clears it
    (`_clear_leftovers`). `needed`: bytes the folder will take, checked against the free
    space first."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if needed is not None:
        check_space(target.parent, needed, what)
    _clear_leftovers(target, target.name)
    tmp = _sibling(target, "tmp", os.getpid(), target.name, "")
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from a write that failed
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        _failed(error, what, target, needed)
        raise
    old = _sibling(target, "old", os.getpid(), target.name, "")
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield `<stem>.tmp-<host>-<pid><suffix>` beside `path` to write (the suffix kept for writers
    that read the format from it); when the block ends without error it replaces `path` in
    one rename. On an error the temporary file is removed, `path` untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(target, target.stem, target.suffix)
    tmp = _sibling(target, "tmp", os.getpid(), target.stem, target.suffix)
    try:
        yield tmp
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        _failed(error, target.name, target, None)
        raise
    os.replace(tmp, target)


def write_text(path: str | Path, text: str) -> None:
    """`Path.write_text`, whole or not at all (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_writable(paths: Mapping[str, str]) -> None:
    """ConfigError unless each output folder (config key -> path) is a folder this process can
    create or write: found now, not when the run ends and its results are written."""
    for key, path in paths.items():
        target = Path(path)
        existing = next(p for p in (target, *target.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(
                f"{key}={path}: {existing} is a file, not a folder; choose another {key}"
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={path}: {existing} is not writable; choose another {key}")


def check_output_file(key: str, path: str) -> None:
    """ConfigError unless `path` (set by config `key`) is a file this process can write, its
    folder made if missing: checked before the work whose results go there."""
    if os.path.isdir(path):
        raise ConfigError(f"{key}={path} is a folder: pass a file name, e.g. {key}={path}/out.json")
    check_writable({key: os.path.dirname(os.path.abspath(path))})
