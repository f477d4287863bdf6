"""Is there per-image signal for prompt choice in the observation? A supervised check.

Reads a finished run (its split, config, backend id and inference cache; no model runs) and fits
a ridge regression from the observation features of the default prompt's state (image + mask
features, exactly what a prompt policy sees at reset) to each prompt's Dice gain on the TRAIN
split, then picks per test image the prompt with the highest predicted gain. It prints the test
Dice of: the default prompt, the best fixed prompt (by train Dice), the ridge pick, the oracle.

If the ridge pick beats the best fixed prompt while ``prompt_rl`` does not, PPO is short of
samples, not of information.

Usage::

    python benchmarks/prompt_signal.py runs/quick
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from envs.features import image_features, mask_features
from envs.sources import load_samples
from models.metrics import mask_metrics
from models.segmentation import image_digest
from orchestrator.config import parse_config
from orchestrator.inference.cache import CacheKey, InferenceCache


def features_and_dice(run: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    config = parse_config(yaml.safe_load((run / "config.yaml").read_text()))
    backend_id = json.loads((run / "summary.json").read_text())["backend_id"]
    cache = InferenceCache(Path(config.workers.cache_dir).expanduser(), 0)
    prompts = config.env.prompts
    data = config.data.path or str(run / "data")
    rows, dices = [], []
    for sample in load_samples(data, split=split, manifest=run / "split_manifest.json"):
        digest = image_digest(sample.image)
        hits = [cache.get(CacheKey(backend_id, digest, p), sample.image.shape[:2]) for p in prompts]
        if any(hit is None for hit in hits):
            raise SystemExit(f"{sample.id}: not all prompts are cached; run the full split first")
        segs = [hit.segmentation for hit in hits if hit is not None]
        assert sample.mask is not None
        dices.append([mask_metrics(s.mask, sample.mask).dice for s in segs])
        default = segs[prompts.index(config.env.default_prompt)]
        image_part = image_features(sample.image)
        rows.append(np.concatenate([image_part, mask_features(default.mask, default.prob)]))
    return np.array(rows), np.array(dices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run directory")
    parser.add_argument("--ridge", type=float, default=1.0, help="L2 penalty")
    args = parser.parse_args()
    x_train, d_train = features_and_dice(args.run, "train")
    x_test, d_test = features_and_dice(args.run, "test")
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a = np.c_[(x_train - mean) / std, np.ones(len(x_train))]
    b = np.c_[(x_test - mean) / std, np.ones(len(x_test))]
    # Any reference column gives the same argmax; the first keeps the numbers small.
    gains = d_train - d_train[:, :1]
    weights = np.linalg.solve(a.T @ a + args.ridge * np.eye(a.shape[1]), a.T @ gains)
    pick = (b @ weights).argmax(1)
    fixed = int(d_train.mean(0).argmax())
    print(f"train images {len(d_train)}, test images {len(d_test)}")
    print(f"test Dice  first prompt        {d_test[:, 0].mean():.3f} (the default in base.yaml)")
    print(f"           best fixed (train)  {d_test[:, fixed].mean():.3f}")
    print(f"           ridge pick          {d_test[np.arange(len(d_test)), pick].mean():.3f}")
    print(f"           oracle              {d_test.max(1).mean():.3f}")


if __name__ == "__main__":
    main()
