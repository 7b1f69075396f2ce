"""Where a site's data and cache are: from the SuperNode's node config (deployment) or the simulation partition.

Deployment (``flower-client`` starts ``flower-supernode --node-config``)::

    data-dir="/data/glioma"  cache-dir="/var/cache/strpnet"  site-name="hospital-a"

Simulation (``strpnet simulate``): Flower gives each simulated SuperNode ``partition-id`` / ``num-partitions``;
the run config's ``data-root`` holds one raw folder per site and ``cache-root`` one cache folder per site. Partition
``p`` is the ``p``-th site folder in name order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strpnet_core.federation import FederationConfig, SiteCache, prepare_site_cache

#: Folders of a data root that are never sites (the synthetic generator's truth, hidden folders).
NOT_SITES = frozenset({"truth"})


@dataclass(frozen=True)
class SiteLocation:
    """Resolved paths of one site.

    Attributes
    ----------
    site_name:
        The site's name.
    data_dir:
        Raw site folder, or None when only a cache is given.
    cache_dir:
        Cache folder (created on first use).
    """

    site_name: str
    data_dir: Path | None
    cache_dir: Path


def list_sites(root: str | os.PathLike[str]) -> list[Path]:
    """Site folders of a data or cache root, in name order (hidden folders and ``truth`` excluded)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of site folders")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_SITES)


def resolve_site(node_config: Mapping[str, Any], cfg: FederationConfig) -> SiteLocation:
    """Resolve a site's data and cache folders from the node config (or the simulation partition).

    Parameters
    ----------
    node_config:
        ``context.node_config`` of the ClientApp.
    cfg:
        The run configuration (simulation roots).

    Returns
    -------
    SiteLocation

    Raises
    ------
    ValueError
        When the node config names neither a site nor a partition, or the partition has no site folder.
    """
    if "data-dir" in node_config or "cache-dir" in node_config:
        data = Path(str(node_config["data-dir"])).expanduser() if node_config.get("data-dir") else None
        name = str(node_config.get("site-name") or (data.name if data is not None else ""))
        if not name:
            raise ValueError("node config: give site-name (or data-dir) for this SuperNode")
        if node_config.get("cache-dir"):
            cache = Path(str(node_config["cache-dir"])).expanduser()
        else:
            cache = Path.home() / ".cache" / "strpnet" / name
        return SiteLocation(site_name=name, data_dir=data, cache_dir=cache)
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        if cfg.data_root:
            sites = list_sites(cfg.data_root)
        elif cfg.cache_root:
            sites = list_sites(cfg.cache_root)
        else:
            raise ValueError("simulation: the run config gives neither data-root nor cache-root")
        if not 0 <= pid < len(sites):
            raise ValueError(
                f"simulation: partition {pid} has no site folder ({len(sites)} site(s) under "
                f"{cfg.data_root or cfg.cache_root}); use num-supernodes <= {len(sites)}"
            )
        name = sites[pid].name
        cache_root = Path(cfg.cache_root) if cfg.cache_root else Path(cfg.data_root).parent / "cache"
        return SiteLocation(site_name=name, data_dir=sites[pid] if cfg.data_root else None,
                            cache_dir=cache_root / name)
    raise ValueError(
        "node config: expected data-dir/cache-dir/site-name (flower-client) or partition-id (simulation), got "
        f"{sorted(node_config)}"
    )


def ready_site(node_config: Mapping[str, Any], cfg: FederationConfig) -> SiteCache:
    """Resolve the site and make sure its cache is ready (first use validates and preprocesses, under a lock).

    Inside a ClientApp the preprocessing stays in this process (``workers=1``): a simulated site is a Ray actor
    given its share of the CPUs, and a pool per site would put sites x cores processes on the machine.
    (``flower-client`` and ``strpnet simulate`` preprocess before Flower starts, with one worker per core.)"""
    loc = resolve_site(node_config, cfg)
    return prepare_site_cache(loc.data_dir, loc.cache_dir, site_name=loc.site_name, preset=cfg.preset, seed=cfg.seed,
                              workers=1)
