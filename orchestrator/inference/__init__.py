"""Segmentation inference: the worker (actor body), its result cache and statistics, the pool
that starts workers, and the client environments call."""
