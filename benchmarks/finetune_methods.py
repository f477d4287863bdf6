"""Reward-gradient vs per-pixel policy-gradient fine-tuning of the Frangi head, on a finished run.

  python benchmarks/finetune_methods.py RUN_DIR --out /tmp/ft-methods [--steps 40]

Runs the ``reward_finetune`` trial once per ``finetune.method`` (``reward_gradient``,
``policy_gradient``) from RUN_DIR's reward net, data, split and settings (``--steps`` and
``--kl-weight`` override them), on the same training images with the same seed, and prints, for
each evaluation, the val reward-net score and the val GT Dice (a reference), then each method's
CPU seconds. Everything is written under OUT/<method>/ (RUN_DIR is only read). Expect the
gradient to raise the reward-net score faster per step: REINFORCE sees one scalar per sampled
mask for ~260k pixel decisions.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from orchestrator.config import parse_config
from orchestrator.data import prepare_data
from orchestrator.experiments import TrialSpec, trial
from orchestrator.inference.backend_spec import BackendSpec
from orchestrator.inference.client import SegmentationClient
from orchestrator.inference.worker import SegmentationWorker
from orchestrator.run_dir import RunPaths
from orchestrator.run_id import new_run_id
from orchestrator.training.finetune import HISTORY_FILE, run_finetune, trial_dir
from orchestrator.training.local import LocalSink
from orchestrator.training.trial_status import READY, host_locally

METHODS = ("reward_gradient", "policy_gradient")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run directory (with a reward net)")
    parser.add_argument("--out", type=Path, required=True, help="where each method's trial goes")
    parser.add_argument("--steps", type=int, help="override finetune.steps")
    parser.add_argument("--kl-weight", type=float, help="override finetune.kl_weight")
    args = parser.parse_args()
    run = RunPaths(args.run.expanduser().resolve())
    saved = yaml.safe_load(run.config.read_text())
    prepared = prepare_data(parse_config(saved), run)
    # The run's own Frangi backend through an in-process worker, as `train --local` runs it.
    segmenter = SegmentationClient.in_process([SegmentationWorker("w0", BackendSpec("frangi"))])
    for method in METHODS:
        finetune = {**saved.get("finetune", {}), "method": method}
        if args.steps is not None:
            finetune["steps"] = args.steps
        if args.kl_weight is not None:
            finetune["kl_weight"] = args.kl_weight
        config = parse_config({**saved, "finetune": finetune})
        root = args.out.expanduser().resolve() / method
        root.mkdir(parents=True, exist_ok=True)
        link = RunPaths(root).reward_net_dir
        if not link.exists():
            link.symlink_to(run.reward_net_dir)
        run_id = new_run_id()
        host_locally(run_id, str(root)).set("reward_net", READY)  # the finished run's net
        spec = TrialSpec(
            trial("reward_finetune"), config, str(root), run_id, segmenter.backend_id, prepared.ref
        )
        start = time.process_time()
        run_finetune(spec, segmenter, LocalSink(root / "trial"))
        history = json.loads(
            (trial_dir(RunPaths(root), "reward_finetune") / HISTORY_FILE).read_text()
        )
        seconds = time.process_time() - start
        print(f"{method}: {seconds:.1f} CPU s, kept step {history['selected_step']}")
        print("  step  reward-net score  val GT Dice  reward-net Dice error")
        for p in history["points"]:
            print(
                f"  {p['step']:4d}  {p['reward_net_score']:16.4f}  {p['gt_dice']:11.4f}  "
                f"{p['reward_net_mae']:21.4f}"
            )


if __name__ == "__main__":
    main()
