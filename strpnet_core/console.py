"""Shared start-up of the deployment commands ``flower-server`` and ``flower-client``."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable

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
    args = parser.parse_args(argv)
    try:
        return run(args)
    except REPORTED_ERRORS as exc:
        log.error("%s", exc)
        return 1
