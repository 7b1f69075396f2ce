"""The Flower ClientApp of a site: translate Flower messages into ``strpnet_core.federation`` calls.

- ``train``: global weights (ArrayRecord ``arrays``) -> local epochs on the site's training split -> new weights,
  ``num-examples`` and training means (MetricRecord ``metrics``; zeros when the split is smaller than the site's
  ``min-eval-patients``).
- ``evaluate``: global weights -> aggregate counts on the site's held-out split (MetricRecord ``metrics``): pair
  counts for the concordance, Dice sums, loss sum, numbers of patients and events. No per-patient value; a split
  smaller than the site's ``min-eval-patients`` (node config, default 2) sends zero counts (``client/audit.py``).
- ``query.sampling_key``: the site's sampling key for the run (``federation.sampling_key``), which a simulation's
  server asks for when it samples a fraction of the sites (``sampling-keys``); no data is read.

Every reply passes the privacy audit mod (``client/audit.py``): only the model's arrays and allow-listed aggregate
keys may leave the site; anything else is replaced by an error reply.

The global round seen by the site is ``server-round + round-offset`` (the server sets the offset when it resumes),
so that a resumed run trains exactly like an uninterrupted one.
"""

from __future__ import annotations

import logging
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.logger import log as flwr_log

from strpnet_core.environment import coordinator_versions, library_versions, version_differences
from strpnet_core.federation import (
    SAMPLING_KEY,
    SAMPLING_QUERY,
    FederationConfig,
    local_evaluate,
    local_train,
    sampling_key,
)

from .audit import (
    METRICS_RECORD,
    min_eval_patients,
    privacy_audit_mod,
    suppress_small_evaluation,
    suppress_small_training,
)
from .dp_mod import dp_clipping_mod
from .site_data import ready_site, resolve_site

log = logging.getLogger(__name__)

#: Mods of every message, outermost first. ``privacy_audit_mod`` stays first so that it inspects the reply that
#: actually leaves the site, after every other mod (``client/audit.py``). Append further mods after it.
CLIENT_MODS: list[Mod] = [privacy_audit_mod]
#: Mods of train messages only (inside CLIENT_MODS), e.g. Flower's ``fixedclipping_mod`` for client-side DP.
TRAIN_MODS: list[Mod] = [dp_clipping_mod]  # clips the update only when the server asks (dp = "client-fixed")

app = ClientApp(mods=CLIENT_MODS)


def _config(msg: Message) -> Any:
    """The message's config record (empty when it has none)."""
    return msg.content["config"] if "config" in msg.content.config_records else {}


def _global_round(msg: Message) -> int:
    config = _config(msg)
    return int(config.get("server-round", 0)) + int(config.get("round-offset", 0))


def _say_version_differences(msg: Message, site_name: str) -> None:
    """Warn in the site's log when its libraries differ from the coordinator's (sent with the train message)."""
    theirs = coordinator_versions(_config(msg))
    if theirs is not None and (diff := version_differences(library_versions(), theirs)):
        flwr_log(WARNING, "[strpnet] site %s: libraries differ from the coordinator's: %s (this site's results are not "
            "bit-identical to the others'; install the coordinator's versions: docs/deployment.md, section 1)",
            site_name, "; ".join(diff))


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's data and reply with weights and metrics."""
    cfg = FederationConfig.from_run_config(context.run_config)
    site = ready_site(context.node_config, cfg)
    _say_version_differences(msg, site.site_name)
    weights, metrics = local_train(
        msg.content["arrays"].to_torch_state_dict(),
        site.cache_dir,
        cfg,
        server_round=_global_round(msg),
        site_name=site.site_name,
    )
    metrics = suppress_small_training(metrics, min_eval_patients(context.node_config), site_name=site.site_name)
    content = RecordDict({"arrays": ArrayRecord(weights), METRICS_RECORD: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's held-out patients; reply with aggregate counts only."""
    cfg = FederationConfig.from_run_config(context.run_config)
    site = ready_site(context.node_config, cfg)
    k = min_eval_patients(context.node_config)
    metrics = local_evaluate(msg.content["arrays"].to_torch_state_dict(), site.cache_dir, cfg, site_name=site.site_name,
                             server_round=_global_round(msg), min_patients=k)
    metrics = suppress_small_evaluation(metrics, k, site_name=site.site_name)
    return Message(content=RecordDict({METRICS_RECORD: MetricRecord(metrics)}), reply_to=msg)


@app.query(SAMPLING_QUERY)
def query_sampling_key(msg: Message, context: Context) -> Message:
    """Reply with this site's sampling key for the run (the server orders the nodes by it when it samples)."""
    cfg = FederationConfig.from_run_config(context.run_config)
    site_name = resolve_site(context.node_config, cfg).site_name
    key = sampling_key(cfg.seed, site_name)
    return Message(content=RecordDict({METRICS_RECORD: MetricRecord({SAMPLING_KEY: key})}), reply_to=msg)
