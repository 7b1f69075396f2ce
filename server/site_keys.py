"""The coordinator's site keys: register the ``--site-key`` files, revoke the ones dropped from the list.

Flower 1.42 keeps registered public keys in the SuperLink's database, and its CLI lists nodes by id only (no key).
``flower-server`` therefore records which key it registered as which node, in ``STATE_DIR/superlink.site_keys.json``
next to the database, and checks the command line against it at every start: a key given is registered; a key recorded
but no longer given stops the start, unless ``--revoke-missing`` asks to unregister it (``flwr supernode
unregister``), after which the SuperLink refuses that site's SuperNode. Flower keeps an unregistered key in its
database and never registers it again, so a revoked site rejoins with a new key pair: revocation is explicit
because it cannot be undone, and a key left out by mistake must not let a removed site keep training either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strpnet_core.fsutil import atomic_write_json

from .launch import CONNECTION, run_flwr


def record_path(database: str | os.PathLike[str]) -> Path:
    """The record of the SuperLink database ``database``: ``superlink.db`` -> ``superlink.site_keys.json``."""
    return Path(database).with_suffix(".site_keys.json")


def key_fingerprint(public_key: str | os.PathLike[str]) -> str:
    """Fingerprint of an OpenSSH public key file, as ``ssh-keygen -l -f KEY.pub`` prints it.

    ``"SHA256:" + base64(sha256(blob))`` without padding, where ``blob`` is the key's second field base64-decoded.
    ValueError naming the file when it is not one line ``TYPE BASE64 [COMMENT]``.
    """
    path = Path(public_key)
    fields = path.read_text(encoding="ascii", errors="replace").split()
    try:
        if len(fields) < 2:
            raise ValueError("fewer than two fields")
        blob = base64.b64decode(fields[1], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"{path}: not an OpenSSH public key line 'TYPE BASE64 [COMMENT]' ({exc})") from exc
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _flwr_json(args: list[str], flwr_home: str | os.PathLike[str]) -> dict[str, Any]:
    """Run ``flwr ARGS strpnet --format json``; its JSON answer (``success`` false carries ``error-message``)."""
    res = run_flwr([*args, CONNECTION, "--format", "json"], flwr_home, timeout_s=60)
    try:
        doc = json.loads(res.stdout[res.stdout.find("{"):])
    except ValueError as exc:
        raise RuntimeError(f"flwr {' '.join(args)} failed (exit {res.returncode}): "
                           f"{(res.stdout + res.stderr).strip()[-1000:]}") from exc
    if not isinstance(doc, dict):
        raise RuntimeError(f"flwr {' '.join(args)} printed {doc!r}, not a JSON object")
    return doc


def register_supernode(public_key: str | os.PathLike[str], flwr_home: str | os.PathLike[str]) -> int | None:
    """``flwr supernode register KEY.pub``: the new node's id, or None when the key is already in the database
    (registered, or unregistered: Flower refuses a key it has seen); RuntimeError with Flower's message otherwise."""
    doc = _flwr_json(["supernode", "register", str(public_key)], flwr_home)
    if doc.get("success"):
        return int(doc["node-id"])
    message = str(doc.get("error-message", doc))
    if "already in use" in message:
        return None
    raise RuntimeError(f"registering {public_key} failed: {message.strip()[-1000:]}")


def unregister_supernode(node_id: int, flwr_home: str | os.PathLike[str]) -> bool:
    """``flwr supernode unregister NODE_ID``: True when it unregistered the node, False when the SuperLink does not
    know it (already unregistered); RuntimeError with Flower's message otherwise."""
    doc = _flwr_json(["supernode", "unregister", str(node_id)], flwr_home)
    if doc.get("success"):
        return True
    message = str(doc.get("error-message", doc))
    if "not found" in message.lower():
        return False
    raise RuntimeError(f"unregistering node {node_id} failed: {message.strip()[-1000:]}")


def listed_nodes(flwr_home: str | os.PathLike[str]) -> dict[int, str]:
    """Every node of the SuperLink (``flwr supernode list``): node id -> status (registered, online, offline,
    unregistered)."""
    doc = _flwr_json(["supernode", "list"], flwr_home)
    if not doc.get("success"):
        raise RuntimeError(f"flwr supernode list failed: {doc.get('error-message', doc)}")
    return {int(n["node-id"]): str(n.get("status", "")) for n in doc.get("nodes", [])}


@dataclass
class KeySync:
    """What :func:`sync_site_keys` did; every path is a ``--site-key`` file, every int a node id."""

    registered: list[tuple[str, int]] = field(default_factory=list)
    """Keys registered now."""
    kept: list[tuple[str, int | None]] = field(default_factory=list)
    """Keys already registered (node id None: registered before this record existed)."""
    revoked: list[tuple[str, int]] = field(default_factory=list)
    """Recorded keys no longer given: unregistered now (the recorded path of the key)."""
    unknown: list[int] = field(default_factory=list)
    """Nodes the SuperLink admits that no given key accounts for (registered by hand, or before this record)."""
    refused: list[tuple[str, int]] = field(default_factory=list)
    """Given keys whose node was unregistered outside ``flower-server``: the SuperLink refuses them."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def sync_site_keys(keys: Sequence[str | os.PathLike[str]], flwr_home: str | os.PathLike[str],
                   record: str | os.PathLike[str], *, fresh_database: bool, revoke_missing: bool = False) -> KeySync:
    """Make the running SuperLink admit exactly the sites of ``keys``, as far as this record knows them.

    Recorded keys not in ``keys`` are unregistered with ``revoke_missing``, else nothing is changed and ValueError
    names them.

    The record (JSON: ``registered`` and ``revoked``, each fingerprint -> ``{"node_id", "key", "at"}``) is
    rewritten atomically after every change, so a coordinator killed half-way leaves it true. With
    ``fresh_database`` (the SuperLink started on a new database) an earlier record is ignored.

    Raises
    ------
    ValueError
        A key that this coordinator revoked earlier (Flower never registers it again: the site needs a new key
        pair), a recorded key missing from ``keys`` without ``revoke_missing``, or a file that is no OpenSSH
        public key; nothing is changed then.
    RuntimeError
        Flower refused a registration or an unregistration (its message).
    """
    path = Path(record)
    doc: dict[str, dict[str, dict[str, Any]]] = {"registered": {}, "revoked": {}}
    if path.is_file() and not fresh_database:
        try:
            loaded = json.loads(path.read_text())
            doc = {k: dict(loaded.get(k, {})) for k in doc}
        except (ValueError, AttributeError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable record of registered site keys ({exc}); "
                             "move it away to start a new one") from exc
    given: dict[str, str] = {}
    for k in keys:
        given.setdefault(key_fingerprint(k), str(Path(k).resolve()))
    for fp, key in given.items():
        if fp in doc["revoked"]:
            old = doc["revoked"][fp]
            raise ValueError(f"--site-key {key}: this key ({fp}) was revoked at {old['at']} (node {old['node_id']}); "
                             "Flower never admits a revoked key again: the site makes a new key pair "
                             "(deploy/make_certs.sh DIR --site NAME --keys-only --force)")
    missing = [fp for fp in doc["registered"] if fp not in given]
    if missing and not revoke_missing:
        named = "; ".join(f"{doc['registered'][fp]['key']} (node {doc['registered'][fp]['node_id']}, {fp})"
                          for fp in missing)
        raise ValueError(f"site key(s) registered here earlier are not given: {named}. Give them again with "
                         "--site-key, or add --revoke-missing to unregister them (cannot be undone: the site would "
                         "need a new key pair)")
    done = KeySync()
    for fp in missing:
        entry = doc["registered"].pop(fp)
        unregister_supernode(int(entry["node_id"]), flwr_home)
        doc["revoked"][fp] = {**entry, "at": _now()}
        atomic_write_json(path, doc)
        done.revoked.append((str(entry["key"]), int(entry["node_id"])))
    for fp, key in given.items():
        node_id = register_supernode(key, flwr_home)
        if node_id is None:
            known = doc["registered"].get(fp)
            done.kept.append((key, None if known is None else int(known["node_id"])))
            continue
        doc["registered"][fp] = {"node_id": node_id, "key": key, "at": _now()}
        atomic_write_json(path, doc)
        done.registered.append((key, node_id))
    statuses = listed_nodes(flwr_home)
    mine = {int(e["node_id"]) for e in doc["registered"].values()}
    done.unknown = sorted(n for n, status in statuses.items() if status != "unregistered" and n not in mine)
    done.refused = [(key, n) for key, n in done.kept if n is not None and statuses.get(n) == "unregistered"]
    return done
