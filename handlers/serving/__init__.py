"""Serving machinery shared by every task: the base handler, protocols, batching, codec, geometry, limits."""
