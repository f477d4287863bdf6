"""End-to-end benchmark of ``sa2va-rl run``: wall time per stage, and what the shared cache saves.

Runs the given mode (default: quick) on this machine with the built-in data and the Frangi
backend, then prints:

- wall time per stage (config, data, Ray + workers, cache warm-up, Tune, evaluation, report);
- model forward passes actually made vs. the env steps the PPO trials took, plus the reward-net
  and evaluation segmentations: the original scripts made one forward pass per env step;
- a projection to Sa2VA on a GPU: the same counts times ``--latency-ms`` (400 ms by default, a
  simulated Sa2VA forward pass), i.e. model time the original way vs. with the shared cache.

Usage::

    python benchmarks/bench_run.py                       # quick mode, ~10 min on 2 cores
    python benchmarks/bench_run.py --config tune_configs/smoke.yaml
    python benchmarks/bench_run.py --run-dir runs/quick  # just read a finished run

Expect the warm-up and Tune stages to dominate; forward passes equal the distinct (image,
prompt) pairs (each computed once), a small fraction of the env steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ray import tune

from orchestrator import metric_keys as mk
from orchestrator.cli import main


def env_steps(run_dir: Path) -> int:
    frame = tune.ExperimentAnalysis(str(run_dir / "tune")).dataframe()
    return int(frame[mk.ENV_STEPS].fillna(0).sum())


def report(run_dir: Path, latency_ms: float) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"run {run_dir}: mode {summary['mode']}, backend {summary['backend']}")
    print(f"wall time {summary['wall_seconds']:.1f} s, by stage:")
    for stage, seconds in summary["stage_seconds"].items():
        share = 100 * seconds / summary["wall_seconds"]
        print(f"  {stage:10s} {seconds:8.1f} s  {share:5.1f}%")
    steps = env_steps(run_dir)
    passes = summary["inference"]["forward_passes"]
    print(f"PPO env steps (all trials): {steps}")
    print(f"model forward passes:       {passes} (cache hits {summary['inference']['cache_hits']})")
    if passes:
        print(f"env steps per forward pass: {steps / passes:.1f}x")
    original_s = steps * latency_ms / 1000
    cached_s = passes * latency_ms / 1000
    print(
        f"at {latency_ms:.0f} ms per Sa2VA forward pass (simulated): original way "
        f"{original_s:.0f} s of model time for the RL steps alone, shared cache {cached_s:.0f} s "
        f"for everything ({original_s / max(cached_s, 1e-9):.1f}x less)"
    )


def run(args: argparse.Namespace) -> Path:
    out = Path(tempfile.mkdtemp(prefix="sa2va-rl-bench-")) / "run"
    cache = out.parent / "cache"  # a cold cache: the first run pays every forward pass
    start = time.monotonic()
    code = main(
        [
            "run",
            "--config",
            args.config,
            "--output",
            str(out),
            "--cache-dir",
            str(cache),
            "--no-dashboard",
        ]
    )
    print(f"sa2va-rl run exited {code} after {time.monotonic() - start:.1f} s")
    if code != 0:
        sys.exit(code)
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tune_configs/quick.yaml")
    parser.add_argument("--run-dir", type=Path, help="read a finished run instead of running")
    parser.add_argument("--latency-ms", type=float, default=400.0)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    report(arguments.run_dir or run(arguments), arguments.latency_ms)
