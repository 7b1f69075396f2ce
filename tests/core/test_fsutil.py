"""Atomic writes: all or nothing, and the permissions of a plain write."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from strpnet_core.fsutil import atomic_path, atomic_write_json, atomic_write_text, private_dir


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a" / "record.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert target.read_text().strip().endswith("}")
    assert '"x": 2' in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]


def test_failure_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "model.bin"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("killed while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_a_long_final_name_still_gets_a_temporary_file(tmp_path):
    """The temporary name was the final name plus ~45 characters: a 230-character patient id (a legal file name)
    failed with ENAMETOOLONG. It keeps the final suffixes and is still found as a stale part."""
    from strpnet_core.fsutil import _PART_RE

    target = tmp_path / ("P" * 230 + ".qc.json")
    seen = []
    with atomic_path(target) as tmp:
        seen.append(tmp.name)
        tmp.write_text("{}")
    assert target.read_text() == "{}" and seen[0].endswith(".part.qc.json") and _PART_RE.match(seen[0])
    with atomic_path(tmp_path / "SYN01-0001.b.c.nii.gz") as tmp:  # the dots of an id are not a suffix
        assert tmp.name.endswith(".part.nii.gz")
        tmp.write_bytes(b"x")


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "scan.nii.gz"
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz")
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_private_dir_is_closed_to_other_users(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        new = tmp_path / "site" / "cache"
        assert private_dir(new) is None
        assert stat.S_IMODE(new.stat().st_mode) == 0o700
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        warning = private_dir(shared)
        assert warning is not None and "other users of this machine can read it (mode 0755)" in warning
        assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # an existing folder keeps its mode
        group = tmp_path / "group"
        group.mkdir(mode=0o750)
        assert private_dir(group) is None
    finally:
        os.umask(old)


def test_exclusive_lock_waits_then_names_the_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second holder retries until its timeout, then gets an error naming the lock and the holder's PID; a waiter
    gets the lock as soon as the holder leaves (here: dies, which releases it too)."""
    import subprocess
    import sys
    import threading
    import types

    from strpnet_core import fsutil
    from strpnet_core.fsutil import exclusive_lock

    lock = tmp_path / "sub" / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from strpnet_core.fsutil import exclusive_lock\n"
        f"with exclusive_lock({str(lock)!r}, timeout_s=0, busy='x'):\n"
        "    print('held', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        clock, naps = [0.0], []  # a fake clock: the retries are counted, not timed

        def nap(seconds: float) -> None:
            naps.append(seconds)
            clock[0] += seconds

        with monkeypatch.context() as m:
            m.setattr(fsutil, "time", types.SimpleNamespace(monotonic=lambda: clock[0], sleep=nap))
            with pytest.raises(TimeoutError, match=f"^{re.escape(f'{lock}: busy (held by pid {holder.pid})')}$"):
                with exclusive_lock(lock, timeout_s=1.0, busy=f"{lock}: busy"):
                    pass
        assert naps == [0.5, 0.5]  # tried at 0, 0.5 and 1.0 s of the timeout, then gave up
        threading.Timer(1.0, holder.kill).start()
        with exclusive_lock(lock, timeout_s=60.0, busy="never"):  # waits for the kill, then holds it
            assert lock.read_text() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait(timeout=30)
