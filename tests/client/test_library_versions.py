"""The coordinator's library versions travel with every train message; a site whose libraries differ says so in its
own log (nothing goes back)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from strpnet_core.environment import (
    CONFIG_KEY,
    coordinator_versions,
    library_versions,
    version_differences,
)


def test_differences_ignore_torch_build_tags_only() -> None:
    here = {"python": "3.11", "torch": "2.13.0+cpu", "numpy": "2.4.6", "monai": "1.6.1"}
    there = {"python": "3.11", "torch": "2.13.0+cu128", "numpy": "2.4.5", "monai": "1.6.1", "flwr": "1.42.0"}
    assert version_differences(here, there) == ["numpy 2.4.6 here, 2.4.5 at the coordinator"]
    assert version_differences(here, {**there, "torch": "2.12.0"})[1] == "torch 2.13.0+cpu here, 2.12.0 at the coordinator"
    mine = library_versions()
    assert mine["flwr"].startswith("1.42") and mine["python"].count(".") == 1
    assert version_differences(mine, json.loads(json.dumps(mine))) == []
    assert coordinator_versions({CONFIG_KEY: json.dumps(mine)}) == mine
    assert coordinator_versions({}) is None and coordinator_versions({CONFIG_KEY: "not json"}) is None


def test_train_messages_carry_the_coordinator_versions_and_a_site_names_a_difference(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    import client.app as client_app
    from server.strategy import STRPNetFedAvg

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        if hasattr(TaskIdentity, name):
            monkeypatch.setattr(TaskIdentity, name, value)

    class _Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    strategy = STRPNetFedAvg(min_train_nodes=1, min_available_nodes=1)
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), _Grid()))  # type: ignore[arg-type]
    assert len(sent) == 2
    config = sent[0].content["config"]
    assert coordinator_versions(config) == library_versions()
    assert CONFIG_KEY not in next(iter(strategy.configure_evaluate(1, arrays, ConfigRecord(), _Grid())))\
        .content["config"]  # type: ignore[arg-type]

    caplog.set_level(logging.WARNING, logger="flwr")
    monkeypatch.setattr(logging.getLogger("flwr"), "propagate", True)
    client_app._say_version_differences(sent[0], "a")
    client_app._say_version_differences(Message(content=RecordDict(), dst_node_id=1, message_type="train"), "a")
    assert "libraries differ" not in caplog.text  # same environment; a message without config says nothing
    older = dict(library_versions(), numpy="1.26.4")
    msg = Message(content=RecordDict({"config": ConfigRecord({CONFIG_KEY: json.dumps(older)})}), dst_node_id=1,
                  message_type="train")
    client_app._say_version_differences(msg, "a")
    assert f"site a: libraries differ from the coordinator's: numpy {library_versions()['numpy']} here, 1.26.4 " \
           "at the coordinator" in caplog.text
