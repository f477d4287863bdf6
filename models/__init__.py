"""Segmentation backends, segmentation metrics and the reward network.

Nothing here imports Ray: the orchestrator injects these objects (or a Ray client with the same
interface) into the environments.
"""
