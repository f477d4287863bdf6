"""Datasets, mask operations, observation features and the gymnasium environments.

Pure Python + numpy/OpenCV: importable and testable without Ray. Environments receive a
segmenter (see :mod:`models.segmentation`) and never load a model themselves.
"""

from envs.registration import (
    POST_PROCESS,
    PROMPT_SELECTION,
    REWARD_GUIDED_PROMPT,
    register_envs,
)

register_envs()

__all__ = ["POST_PROCESS", "PROMPT_SELECTION", "REWARD_GUIDED_PROMPT", "register_envs"]
