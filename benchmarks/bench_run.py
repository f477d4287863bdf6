"""End-to-end benchmark of ``sa2va-rl run``: the stage table, the trials' timeline, and what the
shared cache saves.

Runs the given mode (default: quick) on this machine with the built-in data and the Frangi
backend on a **cold cache** (a fresh ``--cache-dir``), ``--runs`` times, then prints:

- wall time per stage (config, data, Ray + workers, cache warm-up, Tune, evaluation, report),
  the median over the runs and each run's figure;
- each trial's start and end within the Tune stage (the reward-net trial and the reward-guided
  trial that waits for it are the critical path), from the first run;
- model forward passes vs. the env steps the PPO trials took, and a projection to Sa2VA on a GPU
  (the same counts times ``--latency-ms``, 400 ms by default: a simulated forward pass);
- the methods' Dice (3 decimals), so a speed change that moved a result shows.

With ``--before DIR ...`` (finished runs of the old code, or of another machine) the stage table
gets a "before" median column and the ratio, and the Dice columns are compared.

Usage::

    python benchmarks/bench_run.py                          # one quick run, ~3 min on 2 cores
    python benchmarks/bench_run.py --runs 3                 # the median of 3 cold-cache runs
    python benchmarks/bench_run.py --config tune_configs/smoke.yaml
    python benchmarks/bench_run.py --run-dir runs/a runs/b runs/c --before old/a old/b old/c

Note the machine's load (``uptime``) next to the figures: on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator import metric_keys as mk
from orchestrator.cli import main


def load(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "summary.json").read_text()))


def results(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each trial directory's ``result.json`` rows (read as JSON: no code of the run that wrote
    them is unpickled, so runs of older versions can be read too)."""
    found = {}
    for path in sorted((run_dir / "tune").glob("*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            found[path.parent.name.rsplit("_", 2)[0]] = rows
    return found


def env_steps(run_dir: Path) -> int:
    return int(sum(rows[-1].get(mk.ENV_STEPS, 0) for rows in results(run_dir).values()))


def stage_medians(summaries: list[dict[str, Any]]) -> dict[str, float]:
    stages = [*summaries[0]["stage_seconds"], "total"]
    return {
        stage: statistics.median(
            s["wall_seconds"] if stage == "total" else s["stage_seconds"].get(stage, 0.0)
            for s in summaries
        )
        for stage in stages
    }


def print_stages(after: list[dict[str, Any]], before: list[dict[str, Any]]) -> None:
    now = stage_medians(after)
    old = stage_medians(before) if before else {}
    head = f"  {'stage':10s} {'median':>8s}"
    if old:
        head += f" {'before':>8s} {'ratio':>6s}"
    print(head + "   each run")
    for stage, seconds in now.items():
        line = f"  {stage:10s} {seconds:7.1f}s"
        if old:
            was = old.get(stage)
            if was is not None and was > 0:
                line += f" {was:7.1f}s {seconds / was:6.2f}"
            else:
                line += f" {'-':>8s} {'-':>6s}"
        runs = [s["wall_seconds"] if stage == "total" else s["stage_seconds"][stage] for s in after]
        print(line + "   " + " ".join(f"{r:.1f}" for r in runs))


def trial_timeline(run_dir: Path) -> list[tuple[str, float, float]]:
    """(trial, start s, end s) from each trial's ``result.json``, relative to the first start."""
    spans = []
    for name, rows in results(run_dir).items():
        first, last = rows[0], rows[-1]
        start = float(first["timestamp"]) - float(first.get("time_this_iter_s", 0.0))
        spans.append((name, start, float(last["timestamp"])))
    origin = min((s for _, s, _ in spans), default=0.0)
    return [(name, s - origin, e - origin) for name, s, e in spans]


def print_dice(after: dict[str, Any], before: dict[str, Any] | None) -> None:
    print("  method               Dice" + ("   before" if before else ""))
    for method, m in after["methods"].items():
        line = f"  {method:20s} {m['dice']:.3f}"
        if before:
            was = before["methods"].get(method, {}).get("dice")
            line += f"    {was:.3f}" if was is not None else "        -"
            line += "" if was is None or round(was, 3) == round(m["dice"], 3) else "   changed"
        print(line)


def report(runs: list[Path], before: list[Path], latency_ms: float) -> None:
    summaries = [load(r) for r in runs]
    first = summaries[0]
    print(f"{len(runs)} run(s) of mode {first['mode']}, backend {first['backend']}: ")
    for r in runs:
        print(f"  {r}")
    print(f"wall time by stage ({'median of ' + str(len(runs)) if len(runs) > 1 else 'one run'}):")
    print_stages(summaries, [load(b) for b in before])
    print("trials within the Tune stage (first run; s from the first trial's start):")
    for name, start, end in trial_timeline(runs[0]):
        print(f"  {name:14s} {start:6.0f} -> {end:6.0f}  ({end - start:5.0f} s)")
    steps = env_steps(runs[0])
    inf = first["inference"]
    print(f"PPO env steps (all trials): {steps}")
    print(f"model forward passes:       {inf['forward_passes']} on {inf['workers']} worker(s)")
    print(f"cache hits:                 {inf['cache_hits']}")
    if inf["forward_passes"]:
        print(f"env steps per forward pass: {steps / inf['forward_passes']:.1f}x")
    original_s = steps * latency_ms / 1000
    cached_s = inf["forward_passes"] * latency_ms / 1000
    print(
        f"at {latency_ms:.0f} ms per Sa2VA forward pass (simulated): original way "
        f"{original_s:.0f} s of model time for the RL steps alone, shared cache {cached_s:.0f} s "
        f"for everything ({original_s / max(cached_s, 1e-9):.1f}x less)"
    )
    print_dice(first, load(before[0]) if before else None)
    for label, run_dir in [("reward net", runs[0]), *(("before", b) for b in before[:1])]:
        print_reward_net(label, run_dir)


def print_reward_net(label: str, run_dir: Path) -> None:
    """The reward net's validation quality (Dice target) from ``reward_net/report.json``."""
    path = run_dir / "reward_net" / "report.json"
    if not path.is_file():
        return
    rep = json.loads(path.read_text())
    dice = rep["targets"]["dice"]
    print(
        f"  {label}: val Dice MAE {dice['mae']:.4f} "
        f"(mean predictor {dice['mean_predictor_mae']:.4f}),"
        f" Spearman {dice['spearman']:.3f}, within-image {dice['within_image_spearman']:.3f}, "
        f"best epoch {rep['best_epoch']} of {rep['epochs']}, {rep['n_train']} train examples"
    )


def run(config: str) -> Path:
    out = Path(tempfile.mkdtemp(prefix="sa2va-rl-bench-")) / "run"
    cache = out.parent / "cache"  # a cold cache: the run pays every forward pass
    print(f"load before the run: {os.getloadavg()[0]:.2f} (1-min average)", flush=True)
    start = time.monotonic()
    args = ["run", "--config", config, "--output", str(out), "--cache-dir", str(cache)]
    code = main([*args, "--no-dashboard"])
    print(f"sa2va-rl run exited {code} after {time.monotonic() - start:.1f} s", flush=True)
    print(f"load after the run: {os.getloadavg()[0]:.2f} (1-min average)", flush=True)
    if code != 0:
        sys.exit(code)
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tune_configs/quick.yaml")
    parser.add_argument("--runs", type=int, default=1, help="cold-cache runs to take the median of")
    parser.add_argument("--run-dir", type=Path, nargs="+", help="read finished runs instead")
    parser.add_argument("--before", type=Path, nargs="*", default=[], help="runs to compare with")
    parser.add_argument("--latency-ms", type=float, default=400.0)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    dirs = arguments.run_dir or [run(arguments.config) for _ in range(arguments.runs)]
    report(dirs, arguments.before, arguments.latency_ms)
