"""Datasets, mask operations, observation features and the gymnasium environments.

Pure Python + numpy/OpenCV: importable and testable without Ray. Environments receive a
segmenter (see :mod:`models.segmentation`) and never load a model themselves.
"""
