"""The Ray side of sa2va-rl: CLI, run pipeline, GPU memory plan, shared segmentation workers,
Tune/RLlib wiring, evaluation and the report."""
