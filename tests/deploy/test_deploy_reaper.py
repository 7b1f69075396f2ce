"""``strpnet_core.reaper``: the supervisor under which SuperLinks and SuperNodes run stops the detached processes of
their Flower home (as Flower's SuperExec and Ray are) when it is stopped and when its parent is SIGKILLed.
Real processes (``sleep`` in a new session, like ``flower-superexec``), Linux only, bounded waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from strpnet_core.console import die_with_parent_kwargs
from strpnet_core.console import flower_env, stop_process
from strpnet_core.reaper import flower_processes, is_gone, process_environ

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and prctl")

#: A "program" that starts a detached grandchild (own session, like Flower's SuperExec) and then waits.
PROGRAM = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(300)
""")

#: The same, but the program ignores SIGTERM (as a busy Flower process may for a while) and prints its own PID too.
STUBBORN = textwrap.dedent("""
    import os, signal, subprocess, time
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # after the child's start: an ignored signal is inherited
    print(os.getpid(), child.pid, flush=True)
    time.sleep(300)
""")


def _wait_for(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _supervised(home: Path, program: str = PROGRAM) -> list[str]:
    return [sys.executable, "-m", "strpnet_core.reaper", "--home", str(home), "--", sys.executable, "-c", program]


def _kill_all(home: Path) -> None:
    for pid in flower_processes(home):
        os.kill(pid, signal.SIGKILL)


def test_stopping_the_supervisor_stops_the_detached_grandchild(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = subprocess.Popen(_supervised(home), env=flower_env(home), stdout=subprocess.PIPE, text=True,
                            **die_with_parent_kwargs())
    try:
        assert proc.stdout is not None
        grandchild = int(proc.stdout.readline())
        # Found by its FLWR_HOME although in another session (waited for: Popen returns once the exec is past its
        # point of no return, a moment before the kernel shows the new process's environment).
        assert _wait_for(lambda: grandchild in flower_processes(home), 10), flower_processes(home)
        assert os.getpgid(grandchild) != os.getpgid(proc.pid)
        stop_process(proc, timeout_s=20)
        assert _wait_for(lambda: not flower_processes(home), 10), flower_processes(home)
    finally:
        stop_process(proc)
        _kill_all(home)


def test_a_killed_parent_takes_the_supervised_tree_along(tmp_path: Path) -> None:
    home = tmp_path / "home"
    # parent (like flower-server) -> supervisor -> program -> detached grandchild; then SIGKILL the parent.
    parent_code = textwrap.dedent(f"""
        import subprocess, sys, time
        from strpnet_core.console import die_with_parent_kwargs
        subprocess.Popen({_supervised(home)!r}, **die_with_parent_kwargs())
        time.sleep(300)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=flower_env(home), start_new_session=True)
    try:
        assert _wait_for(lambda: len(flower_processes(home)) >= 4, 60), flower_processes(home)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait_for(lambda: not flower_processes(home), 20), flower_processes(home)
    finally:
        stop_process(parent)
        _kill_all(home)


def test_a_stopped_supervisor_does_not_wait_for_the_program_before_the_rest(tmp_path: Path) -> None:
    """The detached processes of the run get their stop signal with the program, not after its grace period: a
    simulation process would otherwise go on running rounds while a slow SuperLink shuts down."""
    home = tmp_path / "home"
    proc = subprocess.Popen(_supervised(home, STUBBORN), env=flower_env(home), stdout=subprocess.PIPE, text=True,
                            **die_with_parent_kwargs())
    try:
        assert proc.stdout is not None
        program, grandchild = (int(x) for x in proc.stdout.readline().split())
        assert _wait_for(lambda: grandchild in flower_processes(home), 10), flower_processes(home)
        os.kill(proc.pid, signal.SIGTERM)  # the supervisor only (the program ignores SIGTERM anyway)
        assert _wait_for(lambda: is_gone(grandchild), 10), "the detached grandchild outlived the stop"
        assert not is_gone(program), "the grandchild was stopped only after the program's grace period"
        assert proc.wait(timeout=20) is not None
        assert _wait_for(lambda: not flower_processes(home), 10), flower_processes(home)
    finally:
        stop_process(proc)
        _kill_all(home)


def test_an_empty_environment_read_is_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live process's environment is read as it was started; an empty read is None ("ask again"), not a process with
    no variables: the kernel shows no environment between ``execve``'s point of no return and the set-up of the new
    stack, and a CI run recorded ``{}`` as the environment of a Flower process caught in that window."""
    env = flower_env(tmp_path / "home")
    child = subprocess.Popen(["sleep", "60"], env=env)
    try:
        assert _wait_for(lambda: process_environ(child.pid) is not None, 10)
        assert process_environ(child.pid) == env
        monkeypatch.setattr(Path, "read_bytes", lambda self: b"")  # the window itself lasts microseconds
        assert process_environ(child.pid) is None
    finally:
        child.kill()
        child.wait(timeout=10)
