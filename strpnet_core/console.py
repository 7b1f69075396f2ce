"""Shared start-up of the deployment commands ``flower-server`` and ``flower-client``, their stop on SIGTERM /
SIGINT (:class:`raise_on_stop_signals`), and the Flower processes that they and ``strpnet simulate`` start:
environment (:func:`flower_env`), executables, ports, and their start and stop (:func:`die_with_parent_kwargs`,
:func:`stop_process`)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: Errors a deployment command reports as one log line and exit code 1 (bad flags, files, an unreachable peer).
REPORTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError, TimeoutError)


def run_deployment_command(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None,
    log: logging.Logger,
) -> int:
    """Parse ``argv``, run ``run(args)`` with Flower telemetry and runtime installs off, and return the exit code.

    Privacy: ``FLWR_TELEMETRY_ENABLED=0`` and ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` are forced (not
    defaulted) for every Flower process the command starts. An error of :data:`REPORTED_ERRORS` is logged as one
    line and gives exit code 1.
    """
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request (the SuperLink's health)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except REPORTED_ERRORS as exc:
        log.error("%s", exc)
        return 1


def die_with_parent_kwargs(sig: int | None = None) -> dict[str, Any]:
    """``subprocess.Popen`` keyword arguments that tie a child to the process starting it.

    On Linux the child asks the kernel (``prctl(PR_SET_PDEATHSIG)``) for ``sig`` (default SIGTERM) when its parent
    dies, however it dies (SIGKILL, OOM killer, a crash): a killed ``flower-server`` / ``strpnet simulate`` /
    ``flower-client`` never leaves a SuperLink or SuperNode behind. Flower's detached descendants (SuperExec,
    ServerApp, simulation with its Ray processes) do not all follow their parent reliably: SuperLinks and SuperNodes
    therefore run under :mod:`strpnet_core.reaper`, which stops them by PID. The child still gets its own
    session (``start_new_session``): :func:`stop_process` stops it with its process group.
    Elsewhere (no ``prctl``) only the session is set.

    Parameters
    ----------
    sig:
        Signal delivered to the child when the parent dies.

    Returns
    -------
    dict
        ``start_new_session=True`` and, on Linux, a ``preexec_fn``.
    """
    import sys

    kwargs: dict[str, Any] = {"start_new_session": True}
    if not sys.platform.startswith("linux"):
        return kwargs
    parent = os.getpid()
    _libc()  # loaded here: the child runs die_with_parent between fork and exec, where nothing heavy may run
    kwargs["preexec_fn"] = lambda: die_with_parent(parent, sig)
    return kwargs


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent_pid: int, sig: int | None = None) -> None:
    """Have this process receive ``sig`` (default SIGTERM) when its parent ``parent_pid`` dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``; nothing elsewhere); exit at once if the parent is already gone.

    For ``subprocess`` children (:func:`die_with_parent_kwargs`) and for the workers of a process pool (call it in
    the pool's initializer with the parent's PID): a SIGTERM/SIGKILL of ``strpnet simulate`` or ``strpnet
    preprocess`` then stops the preprocessing and generation workers too, instead of leaving them running.
    """
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    _libc().prctl(1, int(signal.SIGTERM if sig is None else sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def flower_env(flwr_home: str | os.PathLike[str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower process: its own ``FLWR_HOME``, telemetry off, no runtime dependency installation.

    Also puts the directory of the running Python (the virtual environment's ``bin``) first on ``PATH`` so that
    ``flwr``, ``flower-superlink``, ``flwr-serverapp``, ... are the ones of this installation.
    """
    import sys

    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def flower_executable(name: str) -> str:
    """Path of a Flower console script (``flwr``, ``flower-superlink``, ...) of this installation."""
    import shutil
    import sys

    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: not found beside {sys.executable} nor on PATH; is flwr installed?")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_process(proc: Any, *, timeout_s: float = 15.0) -> int | None:
    """Stop a process we started (``subprocess.Popen``): SIGTERM to it (its process group when it leads one), wait,
    then SIGKILL. Returns its exit code (None if it could not be reaped)."""
    import signal
    import subprocess

    if proc.poll() is not None:
        return proc.returncode
    try:
        pgid = os.getpgid(proc.pid)
        leads_group = pgid == proc.pid
    except ProcessLookupError:
        return proc.poll()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            if leads_group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


class StopRequested(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGINT) raised in the main thread by :class:`raise_on_stop_signals`."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class raise_on_stop_signals:  # noqa: N801 - used as a context manager, like contextlib's
    """Within the ``with`` block, SIGTERM and SIGINT raise :class:`StopRequested` in the main thread, once.

    A command that started processes stops them in ``finally`` blocks as the exception unwinds, inside the block:
    the guard stays installed there. ``stopping()`` (first thing in such a ``finally``) says the stop is under way,
    so that a signal arriving from then on is logged instead of cutting the clean-up short.

    - Python runs a signal handler at the next bytecode of the main thread, which may be in a context whose
      exceptions it ignores: a fork's after-fork hooks (``subprocess.Popen`` with ``preexec_fn``; ``logging``
      registers one), a ``__del__``, a weakref callback. It reports the exception to ``sys.unraisablehook`` and
      goes on; the hook installed here sends the signal again 0.1 s later (a daemon thread), so that it lands in
      ordinary code. If the block ends first, leaving the ``with`` raises the lost stop (when no other exception is
      on its way).
    - A repeated signal while stopping is logged; the third signal overall gets the signal's default action at once
      (the operator insists; the children follow through ``die_with_parent_kwargs``).
    - Previous handlers and hook are restored on leaving the block.
    """

    SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        self._raised: int | None = None  # the signal whose StopRequested is on its way (not known to be lost)
        self._lost: int | None = None  # a StopRequested that Python ignored, being sent again
        self._stopping = False
        self._count = 0
        self._timer: threading.Timer | None = None
        self._previous: dict[int, Any] = {}
        self._previous_hook: Callable[[Any], Any] | None = None

    def stopping(self) -> None:
        """The stop (or the normal end's clean-up) is under way: later signals are logged, not raised."""
        self._stopping = True

    def _handler(self, signum: int, _frame: object) -> None:
        import signal

        self._count += 1
        if self._raised is None and not self._stopping:
            self._raised, self._lost = signum, None
            raise StopRequested(signum)
        if self._count >= 3:
            logging.getLogger(__name__).warning("signal %d a third time: stopping at once", signum)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        logging.getLogger(__name__).warning("signal %d: already stopping (a third signal stops at once)", signum)

    def _unraisable(self, unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, StopRequested) and exc.signum == self._raised:
            self._raised, self._lost = None, exc.signum
            self._count -= 1  # not seen by the code: it does not count towards the forced stop
            self._timer = threading.Timer(0.1, os.kill, (os.getpid(), exc.signum))
            self._timer.daemon = True
            self._timer.start()
            return
        assert self._previous_hook is not None
        self._previous_hook(unraisable)

    def __enter__(self) -> raise_on_stop_signals:
        import signal
        import sys

        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        for name in self.SIGNALS:
            s = getattr(signal, name)
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handler)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        import signal
        import sys

        if self._timer is not None:
            self._timer.cancel()
        for s, h in self._previous.items():
            signal.signal(s, h)
        if self._previous_hook is not None:
            sys.unraisablehook = self._previous_hook
        if exc_type is None and self._lost is not None:
            raise StopRequested(self._lost)
