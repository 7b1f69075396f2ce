"""File-system helpers: atomic writes so that nothing is ever half-written."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Temporary files of :func:`atomic_path`: ``.<final name>.<host>-<pid>.<random>.part<suffixes>``.
_PART_RE = re.compile(r"^\.(?P<final>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.part(\..*)?$")


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def private_dir(path: str | os.PathLike[str]) -> str | None:
    """Create the folder ``path`` (and its parents) for patient-derived files: a new folder gets mode 0700, so that
    other users of the machine cannot list or read what is written into it, whatever the umask gives the files.

    An existing folder keeps its mode (a research team may share one through its group); the returned warning
    (else None) says when other users can enter it (``o+x``) or list it (``o+r``).
    """
    folder = Path(path)
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        return None
    mode = stat.S_IMODE(folder.stat().st_mode)
    if mode & (stat.S_IROTH | stat.S_IXOTH):
        return (f"{folder} holds patient-derived images and other users of this machine can "
                f"{'read' if mode & stat.S_IXOTH else 'list'} it (mode {mode:04o}): chmod o-rwx {folder}")
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (atomic on POSIX).

    The temporary file keeps the final suffix (``.nii.gz``, ``.npz``, ...) so that writers that
    infer the format from the name work, and is named ``.<name>.<host>-<pid>.<random>.part<suffix>`` (hidden;
    :func:`remove_stale_parts` removes the ones left by a killed process; ``<name>`` is cut to its first 64
    characters, so that a final name near the file system's 255-byte limit still gets a temporary file). On any
    exception the temporary file is removed and ``path`` is left untouched: a reader sees either the old file or
    the complete new one, also when the writing process is killed (SIGKILL) at any point. The data is fsynced
    before the rename and the folder after it.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes[-2:])  # .nii.gz, .qc.json, .npz (not the dots of a patient id)
    suffix = (suffix if len(suffix) <= 16 else final.suffix) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name[:64]}.{_host_tag()}-{os.getpid()}.",
                                    suffix=f".part{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would (0666 minus umask).
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str], *, timeout_s: float, busy: str) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on the file ``path`` (created if missing) while the block runs.

    Waits up to ``timeout_s`` seconds (0: try once) for another holder to release it, then raises TimeoutError
    ``"<busy> (held by pid N)"``, N read from the file, where each holder writes its PID. The kernel releases
    the lock when its holder dies, however it dies: a killed process never leaves a stale lock.
    """
    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    holder = fh.read().strip() or "unknown"
                    raise TimeoutError(f"{busy} (held by pid {holder})") from None
                time.sleep(0.5)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems cannot fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def remove_stale_parts(folder: str | os.PathLike[str], *, max_age_s: float = 7 * 86400.0) -> list[Path]:
    """Remove the temporary files that killed writers of :func:`atomic_path` left in ``folder``; return them.

    A temporary file is stale when it was written on this host by a process that no longer runs (its name holds
    host and PID), or, whatever its writer, when it is older than ``max_age_s``. Files of live writers (other
    processes or threads writing now) are kept. Final files are never touched.

    Parameters
    ----------
    folder:
        The folder (not recursed); a missing folder gives an empty list.
    max_age_s:
        Age (modification time) beyond which any temporary file is stale.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host, now = _host_tag(), time.time()
    for entry in entries:
        m = _PART_RE.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > max_age_s
        except OSError:
            continue
        if old or (m["host"] == host and not _pid_alive(int(m["pid"]))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``): setting it to 0
    even for an instant would let files that other threads create meanwhile be world-writable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # elsewhere: set briefly, to a strict value (nothing is created world-writable)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars/arrays (via ``tolist``) and paths; TypeError otherwise."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
