"""The Flower ClientApp of a hospital site (``client.app:app``) and the ``flower-client`` command."""
