"""ST-RPNet federated: the core shared by the Flower client and server.

Data flows one way: raw site folder -> validate -> preprocess (cached, per patient) -> dataset -> model
-> losses/metrics -> client messages -> server aggregation -> checkpoint/final model -> predict/report.
"""

__version__ = "0.1.0"
