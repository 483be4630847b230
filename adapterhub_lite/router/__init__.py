"""Serve many adapters on one frozen backbone, each row of a batch through its own adapter."""
