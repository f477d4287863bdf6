"""Evaluation: the methods, the oracles, statistics, the per-image results and the stage."""
