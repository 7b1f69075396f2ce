"""The Flower ServerApp of the coordinator (``server.app:app``) and the ``flower-server`` command."""
