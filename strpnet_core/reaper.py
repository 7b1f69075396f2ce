"""A small supervisor that stops a Flower program together with every process it spawned, however we die.

Flower detaches part of its process tree: ``flower-superlink`` starts ``flower-superexec`` in a new session, which
starts the ServerApp (``flwr-serverapp``) or the whole simulation (``flwr-simulation`` and its Ray processes:
``gcs_server``, ``raylet``, actors). Those watch their parent's PID and raise SIGINT in themselves when it
disappears, but a simulation busy in Ray keeps running (measured: still training 16 s after its SuperLink was
killed). So every long-lived Flower program we start runs under this supervisor::

    python -m strpnet_core.reaper --home FLWR_HOME -- flower-superlink ...

It starts the program; when the supervisor gets SIGTERM/SIGINT or its own parent dies (``PR_SET_PDEATHSIG``, set by
:func:`strpnet_core.console.die_with_parent_kwargs`), it stops the program and, at the same moment, every live process
whose ``FLWR_HOME`` is ``FLWR_HOME`` (each Flower process of one run has the run's private home, see
:func:`strpnet_core.console.flower_env`): SIGTERM, a bounded wait, then SIGKILL, by PID; when the program exits by
itself, it stops what the program left behind the same way. Linux ``/proc`` is needed for the sweep; elsewhere only
the program itself is stopped. Standard library only (it starts in ~50 ms).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

#: Seconds the program gets between SIGTERM and SIGKILL (the SuperLink stops its SuperExec within 1 s).
STOP_GRACE_S = 5.0
#: Seconds the leftovers of a sweep get between SIGTERM and SIGKILL.
SWEEP_GRACE_S = 3.0


def process_environ(pid: int) -> dict[str, str] | None:
    """The environment a running process started with (Linux ``/proc/PID/environ``); None when unreadable.

    An empty read is None too: the kernel shows no environment for a process between ``execve``'s point of no return
    and the set-up of its new stack (its parent may already know the exec succeeded), nor for one whose memory is
    being released as it exits. CI once read ``{}`` for a Flower process that had been listed a moment before; a
    caller that needs the environment asks again.
    """
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def flower_processes(flwr_home: str | os.PathLike[str], *, exclude: Sequence[int] = ()) -> list[int]:
    """PIDs of the live processes (zombies excluded) whose ``FLWR_HOME`` is ``flwr_home``; [] without ``/proc``.

    Every process of a run (SuperLink, SuperExec, ServerApp or simulation with its Ray processes, ``flwr run``,
    SuperNode, ClientApp) inherits the run's private ``FLWR_HOME``; this finds them, e.g. the leftovers of a killed
    coordinator. The calling process and ``exclude`` are never listed.
    """
    home = str(Path(flwr_home).resolve())
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        return []
    skip = {os.getpid(), *exclude}
    found = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        env = process_environ(int(entry.name))
        if env is not None and env.get("FLWR_HOME") == home and not _is_zombie(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def sweep(flwr_home: str | os.PathLike[str], *, exclude: Sequence[int] = (),
          grace_s: float = SWEEP_GRACE_S) -> list[int]:
    """Stop every live process of ``flwr_home`` (SIGTERM, wait up to ``grace_s``, SIGKILL); return their PIDs."""
    pids = flower_processes(flwr_home, exclude=exclude)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(not is_gone(p) for p in pids):
            _reap_children()
            time.sleep(0.1)
        if all(is_gone(p) for p in pids):
            break
    return pids


def is_gone(pid: int) -> bool:
    """``pid`` no longer runs (no such process, or a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(pid)


def _reap_children() -> None:
    """Collect exited children (orphans reparented to us as a child subreaper included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def supervise(home: str, cmd: Sequence[str]) -> int:
    """Run ``cmd`` until it exits or we are told to stop; then stop it and sweep ``home``; return its exit code."""
    parent = os.getppid()
    _prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans of the tree are reparented to us, not to init
    stop: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)

    def child_setup() -> None:
        _prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG: the program follows us if we are SIGKILLed

    proc = subprocess.Popen(list(cmd), preexec_fn=child_setup if sys.platform.startswith("linux") else None)
    code: int | None = None
    while code is None and not stop:
        try:
            code = proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:  # our parent died (belt and braces beside PR_SET_PDEATHSIG)
                stop.append(0)
    if code is None:
        # Told to stop (or orphaned): the whole run stops at once, not the program first and the rest after it.
        # A simulation process goes on training, round after round, while its SuperLink takes its grace period
        # to exit (seen: 5 more rounds of a tiny run on a loaded machine before the sweep reached it).
        proc.terminate()
        sweep(home, exclude=(parent,))
        try:
            code = proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    sweep(home, exclude=(parent,))
    _reap_children()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m strpnet_core.reaper --home FLWR_HOME -- CMD ...``."""
    p = argparse.ArgumentParser(prog="python -m strpnet_core.reaper", description=__doc__.splitlines()[0])
    p.add_argument("--home", required=True, help="FLWR_HOME of the run: its processes are stopped at the end")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the program and its arguments")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give the program after --")
    return supervise(args.home, cmd)


if __name__ == "__main__":
    sys.exit(main())
