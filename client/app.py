"""The Flower ClientApp of a site: translate Flower messages into ``strpnet_core.federation`` calls.

- ``train``: global weights (ArrayRecord ``arrays``) -> local epochs on the site's training split -> new weights,
  ``num-examples`` and training means (MetricRecord ``metrics``).
- ``evaluate``: global weights -> aggregate counts on the site's held-out split (MetricRecord ``metrics``): pair
  counts for the concordance, Dice sums, loss sum, numbers of patients and events. No per-patient value.

The global round seen by the site is ``server-round + round-offset`` (the server sets the offset when it resumes),
so that a resumed run trains exactly like an uninterrupted one.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from strpnet_core.federation import FederationConfig, local_evaluate, local_train

from .site_data import ready_site

log = logging.getLogger(__name__)

app = ClientApp()


def _global_round(msg: Message) -> int:
    config = msg.content["config"] if "config" in msg.content.config_records else {}
    return int(config.get("server-round", 0)) + int(config.get("round-offset", 0))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's data and reply with weights and metrics."""
    cfg = FederationConfig.from_run_config(context.run_config)
    site = ready_site(context.node_config, cfg)
    weights, metrics = local_train(
        msg.content["arrays"].to_torch_state_dict(),
        site.cache_dir,
        cfg,
        server_round=_global_round(msg),
        site_name=site.site_name,
    )
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's held-out patients; reply with aggregate counts only."""
    cfg = FederationConfig.from_run_config(context.run_config)
    site = ready_site(context.node_config, cfg)
    metrics = local_evaluate(msg.content["arrays"].to_torch_state_dict(), site.cache_dir, cfg, site_name=site.site_name)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
