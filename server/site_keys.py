"""The coordinator's site keys: the ``--site-key`` list of each start is the federation.

Flower 1.42 keeps every registered public key in the SuperLink's database (table ``node``: the key as PEM
SubjectPublicKeyInfo, the node id, the status), also after ``flwr supernode unregister``, and never registers a key
it holds again; its CLI lists nodes without their keys. ``flower-server`` therefore reads that table (read-only) and
at every start checks it against the command line before it changes anything:

- a key given that the database does not hold is registered;
- a key given whose node was unregistered (revoked) stops the start: the site needs a new key pair;
- a key the database admits that is not given stops the start, unless ``--revoke-missing`` asks to unregister it,
  after which the SuperLink refuses that site's SuperNode. Revocation is explicit because it cannot be undone,
  and a key merely left out of the list must not let a removed site go on training either.

Given keys are registered before missing ones are revoked, so a start that fails half-way never leaves a site
revoked and its replacement unregistered; a start killed at any point is repeated from what the database holds.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .launch import flwr_json

#: Node status of an unregistered (revoked) node in Flower's database.
UNREGISTERED = "unregistered"


def load_site_key(public_key: str | os.PathLike[str]) -> bytes:
    """The bytes under which Flower stores a site's OpenSSH public key (PEM SubjectPublicKeyInfo).

    ValueError naming the file when it is not what ``flwr supernode register`` accepts: an OpenSSH EC public key on a
    NIST curve (``deploy/make_certs.sh`` makes P-384 keys).
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    path = Path(public_key)
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path}: not an OpenSSH public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise ValueError(f"{path}: not an EC public key on a NIST curve, which Flower's node authentication needs "
                         "(deploy/make_certs.sh --site NAME --keys-only makes one)")
    return public_key_to_bytes(key)


def fingerprint(pem: bytes) -> str:
    """``SHA256:...`` of a stored key, as ``ssh-keygen -l -f SITE.pub`` prints it for the key's file:
    ``base64(sha256(blob))`` without padding, ``blob`` the OpenSSH wire form of the key."""
    from cryptography.hazmat.primitives import serialization

    line = serialization.load_pem_public_key(pem).public_bytes(serialization.Encoding.OpenSSH,
                                                                serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def stored_keys(database: str | os.PathLike[str]) -> dict[bytes, tuple[int, str]]:
    """Flower's node table, read-only: stored public key -> (node id, status); empty when there is no database."""
    from flwr.supercore.utils import int64_to_uint64

    path = Path(database)
    if not path.is_file():
        return {}
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT public_key, node_id, status FROM node WHERE public_key IS NOT NULL").fetchall()
    except sqlite3.Error as exc:
        raise RuntimeError(f"{path}: cannot read the SuperLink's registered nodes ({exc})") from exc
    finally:
        con.close()
    return {bytes(pem): (int64_to_uint64(int(node_id)), str(status)) for pem, node_id, status in rows}


def register_supernode(public_key: str | os.PathLike[str], flwr_home: str | os.PathLike[str]) -> int:
    """``flwr supernode register KEY.pub``: the new node's id; RuntimeError with Flower's message when refused."""
    doc = flwr_json(["supernode", "register", str(public_key)], flwr_home)
    if not doc.get("success"):
        raise RuntimeError(f"registering {public_key} failed: {str(doc.get('error-message', doc)).strip()[-1000:]}")
    return int(doc["node-id"])


def unregister_supernode(node_id: int, flwr_home: str | os.PathLike[str]) -> None:
    """``flwr supernode unregister NODE_ID``; a node already unregistered is fine, any other refusal a
    RuntimeError with Flower's message."""
    doc = flwr_json(["supernode", "unregister", str(node_id)], flwr_home)
    message = str(doc.get("error-message", doc))
    if not doc.get("success") and "not found" not in message.lower():
        raise RuntimeError(f"unregistering node {node_id} failed: {message.strip()[-1000:]}")


@dataclass
class KeySync:
    """What :func:`sync_site_keys` did: ``(key file, node id)`` pairs, revoked ones as ``(fingerprint, node id)``."""

    registered: list[tuple[str, int]] = field(default_factory=list)
    kept: list[tuple[str, int]] = field(default_factory=list)
    revoked: list[tuple[str, int]] = field(default_factory=list)

    def site_names(self) -> dict[int, str]:
        """Node id -> the name of the site's key file without ``.pub`` (``deploy/make_certs.sh`` names it after the
        site), for every admitted site; ``FOLDER/NAME`` where two files share a name."""
        admitted = sorted(self.registered + self.kept, key=lambda kn: kn[1])
        stems = [Path(key).name.removesuffix(".pub") for key, _ in admitted]
        return {node: stem if stems.count(stem) == 1 else f"{Path(key).parent.name}/{stem}"
                for (key, node), stem in zip(admitted, stems)}


def sync_site_keys(keys: Sequence[str | os.PathLike[str]], flwr_home: str | os.PathLike[str],
                   database: str | os.PathLike[str], *, revoke_missing: bool = False) -> KeySync:
    """Make the running SuperLink (state in ``database``) admit exactly the sites of ``keys`` (module docstring).

    Raises
    ------
    ValueError
        Before any change: a key that is no usable public key, a key given whose node was unregistered, or (without
        ``revoke_missing``) an admitted key that is not given; the message names each by file or by fingerprint
        (``ssh-keygen -l -f SITE.pub`` prints the same) and node id.
    RuntimeError
        Flower refused a registration or an unregistration (its message), or the database cannot be read.
    """
    given: dict[bytes, str] = {}
    for k in keys:
        given.setdefault(load_site_key(k), str(Path(k).resolve()))
    stored = stored_keys(database)
    revoked = [f"{key} (node {stored[pem][0]})" for pem, key in given.items()
               if pem in stored and stored[pem][1] == UNREGISTERED]
    if revoked:
        raise ValueError(f"--site-key {'; '.join(revoked)}: this key was unregistered (revoked) in {database}, and "
                         "Flower never admits a key again: the site makes a new key pair (deploy/make_certs.sh DIR "
                         "--site NAME --keys-only --force)")
    missing = {pem: node for pem, (node, status) in stored.items() if status != UNREGISTERED and pem not in given}
    if missing and not revoke_missing:
        named = "; ".join(f"node {node} ({fingerprint(pem)})" for pem, node in missing.items())
        raise ValueError(f"the SuperLink of {database} admits site key(s) that are not given with --site-key: "
                         f"{named}. Give them again, or add --revoke-missing to unregister them (cannot be undone: "
                         "the site would need a new key pair); `ssh-keygen -l -f SITE.pub` prints a key's fingerprint")
    done = KeySync()
    for pem, key in given.items():
        if pem in stored:
            done.kept.append((key, stored[pem][0]))
        else:
            done.registered.append((key, register_supernode(key, flwr_home)))
    for pem, node in missing.items():
        unregister_supernode(node, flwr_home)
        done.revoked.append((fingerprint(pem), node))
    return done
