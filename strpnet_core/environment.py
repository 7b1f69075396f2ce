"""The library versions that decide what a site computes, and how a site's differ from the coordinator's.

Flower ships the app's code to every site with the run, but not its libraries: a site that installed NumPy, MONAI,
SimpleITK or torch at other versions trains (slightly) differently, and a resumed run is bit-identical only on the
same versions. The coordinator sends its versions with every train message (``library-versions`` in the message's
config); each site compares them with its own and says in its own log what differs (nothing goes back).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from importlib import metadata

#: Distributions whose versions are compared (plus Python's ``major.minor``).
#: strpnet-fed itself is not among them: a run ships its code to every site (the FAB), whatever a site installed.
TRACKED: tuple[str, ...] = ("flwr", "torch", "monai", "SimpleITK", "numpy", "scipy")

#: Key of the coordinator's versions (a JSON object) in a train message's config.
CONFIG_KEY = "library-versions"


def library_versions() -> dict[str, str]:
    """``{distribution: version}`` of :data:`TRACKED` in this environment (``"absent"`` when not installed), and
    ``"python": "major.minor"``."""
    out = {"python": ".".join(platform.python_version_tuple()[:2])}
    for name in TRACKED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _comparable(name: str, version: str) -> str:
    # torch's local build tag (+cpu, +cu128) names the hardware it was built for, which differs by design between
    # a CPU coordinator and a GPU site.
    return version.split("+", 1)[0] if name == "torch" else version


def version_differences(here: Mapping[str, str], coordinator: Mapping[str, str]) -> list[str]:
    """``"NAME VERSION here, VERSION at the coordinator"`` for every library both name whose versions differ
    (torch compared without its local build tag), sorted by name."""
    return [f"{name} {here[name]} here, {coordinator[name]} at the coordinator"
            for name in sorted(set(here) & set(coordinator))
            if _comparable(name, str(here[name])) != _comparable(name, str(coordinator[name]))]


def coordinator_versions(config: Mapping[str, object]) -> dict[str, str] | None:
    """The coordinator's versions from a message's config, or None when it sent none (or not a JSON object)."""
    raw = config.get(CONFIG_KEY)
    if not isinstance(raw, str):
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else None
