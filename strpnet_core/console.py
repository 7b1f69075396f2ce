"""Shared start-up of the deployment commands ``flower-server`` and ``flower-client`` (and of the Flower processes
that they and ``strpnet simulate`` start: :func:`die_with_parent_kwargs`), and their stop on SIGTERM / SIGINT
(:func:`raise_on_stop_signals`)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
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
    session (``start_new_session``): :func:`strpnet_core.federation.stop_process` stops it with its process group.
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


class StopRequested(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGINT) raised in the main thread by :func:`raise_on_stop_signals`."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def raise_on_stop_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`StopRequested` in the main thread, once.

    A command that started processes stops them in its ``finally`` blocks when the exception unwinds. Python runs a
    signal handler at the next bytecode of the main thread, which may be inside a context whose exceptions it
    ignores: a fork's after-fork hooks (``subprocess.Popen``; ``logging`` registers one), a ``__del__``, a weakref
    callback. It then reports the exception to ``sys.unraisablehook`` and goes on, and the stop would be lost; the
    hook installed here sends the signal again 0.1 s later, from a helper thread, so that it lands in ordinary code.
    Signals after the one delivered are logged and ignored: the stop is under way, and a second exception would cut
    its clean-up short (SIGKILL remains for an impatient operator). Previous handlers and hook are restored on exit.
    """
    import signal
    import sys
    import threading

    delivered: list[int] = []  # the signal whose exception reached ordinary code (or is on its way there)

    def handler(signum: int, _frame: object) -> None:
        if delivered:
            logging.getLogger(__name__).warning("signal %d: already stopping (signal %d)", signum, delivered[0])
            return
        delivered.append(signum)
        raise StopRequested(signum)

    previous_hook = sys.unraisablehook

    def redeliver(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, StopRequested) and delivered:
            delivered.clear()  # lost: the next delivery raises again
            threading.Timer(0.1, os.kill, (os.getpid(), unraisable.exc_value.signum)).start()
            return
        previous_hook(unraisable)

    stop_signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in stop_signals}
    sys.unraisablehook = redeliver
    for s in stop_signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sys.unraisablehook = previous_hook
