"""``sa2va-rl plan``: show where segmentation workers go on the GPUs, or why they cannot.

Reads the GPU inventory (NVML on this machine, every node of a running Ray cluster with
--address, or --inventory as declared), places at most one worker per GPU that fits the
model, its activations and the safety margin, and prints a table (node, GPU, total, used, free,
assigned, left) with the Ray settings that enforce it. Exit 0 when at least one worker fits (or
the backend needs no GPU), 2 with a message saying what to change otherwise. sa2va-rl run
builds the same plan and refuses an infeasible one before loading anything.

Example (the original 4 x 24 GB box, partly used by other jobs)::

    sa2va-rl plan --inventory 24:7.5,24:9.5,24:9.6,24:18.3 --model sa2va-4b
    sa2va-rl plan --inventory 24:7.5,24:9.5,24:9.6,24:18.3 --model-path /models/Sa2VA-8B
"""

from __future__ import annotations

import argparse
import json
import logging

from models.errors import UserError
from orchestrator.config import load_config
from orchestrator.gpu import budget as gb
from orchestrator.gpu import footprints
from orchestrator.gpu import inventory as gpu_inventory

DEFAULT_MODEL = "sa2va-4b"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` subcommand."""
    parser = subparsers.add_parser(
        "plan",
        help="plan segmentation workers on the GPUs by memory (what fits where)",
        description=__doc__.split("\n\n")[1],
        epilog=_footprint_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--inventory",
        metavar="SPEC",
        help=f"declared GPUs instead of reading NVML: {gpu_inventory.INVENTORY_FORMAT}",
    )
    source.add_argument(
        "--address",
        metavar="ADDR",
        help="read NVML on every node of this running Ray cluster (e.g. auto) instead of here",
    )
    parser.add_argument(
        "--model-path",
        metavar="DIR",
        help="a Sa2VA model folder: plan its weights as read from the folder (bfloat16, as the "
        "workers load them); a --model given too must agree with them",
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--model",
        choices=footprints.SEGMENTER_MODELS,
        help=f"segmentation backend whose footprint to plan (default {DEFAULT_MODEL})",
    )
    model.add_argument(
        "--model-gb",
        type=float,
        metavar="X",
        help="override: one worker takes X GB in all (weights + activations, e.g. measured)",
    )
    parser.add_argument(
        "--margin-gb",
        type=float,
        default=gb.DEFAULT_MARGIN_GB,
        metavar="Y",
        help=f"safety margin kept free on every GPU (default {gb.DEFAULT_MARGIN_GB} GB)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the plan as JSON (MB)")
    output.add_argument(
        "--ray-start-args",
        action="store_true",
        help="also print the `ray start` line per node that enforces the plan on a cluster",
    )
    disk = parser.add_argument_group("disk plan (what a run writes, against free space)")
    disk.add_argument(
        "--disk",
        action="store_true",
        help="show the disk plan of a run of --config into --output instead of the GPU plan",
    )
    disk.add_argument("--config", metavar="FILE", help="run config (default: quick mode)")
    disk.add_argument(
        "--output", metavar="DIR", help="the run's --output (default: runs/<mode of --config>)"
    )
    disk.add_argument("--cache-dir", metavar="DIR", help="the run's --cache-dir")
    parser.set_defaults(func=run)


def _disk_plan(args: argparse.Namespace) -> int:
    """Print the disk plan of a run (:mod:`orchestrator.disk`); exit 2 when it does not fit."""
    from pathlib import Path

    from orchestrator.disk import plan_before_run
    from orchestrator.pipeline import DEFAULT_CONFIG, RunOptions, default_output
    from orchestrator.run_dir import RunPaths

    options = RunOptions(config=args.config, cache_dir=args.cache_dir)
    config = load_config(args.config or DEFAULT_CONFIG, options.overrides())
    paths = RunPaths(Path(args.output or default_output(options)).expanduser().resolve())
    plan = plan_before_run(config, paths)
    print(plan.format())
    plan.require()
    return 0


def _footprint_table() -> str:
    lines = ["footprints (MB; 1 GB = 1024 MB; input cap 256 / 1024 px):"]
    for name, fp in footprints.FOOTPRINTS.items():
        if not fp.needs_gpu:
            lines.append(f"  {name:<17} CPU only, no GPU memory")
            continue
        params = f", {fp.params_m / 1000:.2f} B params in bf16" if fp.params_m else ""
        low, high = fp.worker_mb(footprints.INPUT_CAPS[-1]), fp.worker_mb(footprints.INPUT_CAPS[0])
        span = f"{low}" if low == high else f"{low} / {high}"
        lines.append(f"  {name:<17} {span} ({fp.kind}{params})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Build the plan, print it, exit 2 (PlanError) when no worker fits."""
    if args.disk:
        return _disk_plan(args)
    if args.margin_gb < 0:
        raise UserError(f"--margin-gb must be >= 0, got {args.margin_gb:g}")
    footprint = _footprint(args)
    inventory = _read_inventory(args)
    plan = gb.build_plan(inventory, footprint, gpu_inventory.gb_to_mb(args.margin_gb))
    if not plan.has_gpus:
        plan.require_workers()  # a GPU backend: PlanError saying no GPU was found
        print(_no_gpu_message(inventory))
        return 0
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(format_plan(plan))
        if args.ray_start_args:
            print(format_ray_start(plan))
    plan.require_workers()
    return 0


def _footprint(args: argparse.Namespace) -> footprints.Footprint:
    if args.model_path is not None:
        from models.sa2va.checkpoint_size import read_model_weights

        checkpoint = read_model_weights(args.model_path)
        if checkpoint is None:
            raise UserError(f"--model-path {args.model_path}: no weight files found there")
        size = args.model.removeprefix("sa2va-") if args.model else None
        if size == "frangi":
            raise UserError("--model frangi and --model-path: the folder is a Sa2VA model")
        return footprints.checkpoint_footprint(checkpoint, "bfloat16", size, args.model_gb)
    if args.model_gb is not None:
        return footprints.custom_footprint(args.model_gb)
    return footprints.FOOTPRINTS[args.model or DEFAULT_MODEL]


def _read_inventory(args: argparse.Namespace) -> tuple[gpu_inventory.NodeInventory, ...]:
    if args.inventory is not None:
        return gpu_inventory.parse_inventory(args.inventory)
    if args.address is None:
        return (gpu_inventory.read_local_node(),)
    import ray

    ray.init(address=args.address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        return gpu_inventory.read_cluster_inventory()
    finally:
        ray.shutdown()


def _no_gpu_message(inventory: tuple[gpu_inventory.NodeInventory, ...]) -> str:
    notes = "; ".join(f"{n.node}: {n.note}" for n in inventory if n.note)
    return (
        f"No GPU found{f' ({notes})' if notes else ''}. The Frangi backend runs on the CPU and "
        f"needs none: nothing to plan. To plan for GPUs elsewhere, declare them: "
        f"{gpu_inventory.INVENTORY_FORMAT}."
    )


def format_plan(plan: gb.GpuPlan) -> str:
    """The plan as a table plus the worker, trial-memory and Ray summary lines."""
    fp = plan.footprint
    if fp.needs_gpu:
        low, high = fp.worker_mb(footprints.INPUT_CAPS[-1]), fp.worker_mb(footprints.INPUT_CAPS[0])
        need = f"{low}" if low == high else f"{low}-{high}"
        head = f"{fp.name}: a worker needs {need} MB + {plan.margin_mb} MB margin on one GPU"
    else:
        head = f"{fp.name}: runs on the CPU, no GPU workers; GPU memory is left to trials"
    header = ("node", "gpu", "total", "used", "free", "assigned", "left", "note")
    rows = [header, *(_row(g) for g in plan.all_gpus)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    table = [
        "  ".join(
            c.ljust(w) if i in (0, 7) else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]
    return "\n".join([head, "(GB; 1 GB = 1024 MB)", *table, *_summary(plan)])


def _row(g: gb.GpuSlot) -> tuple[str, ...]:
    assigned = (
        f"{gpu_inventory.mb_to_gb(g.worker_mb):.1f} @{g.input_cap}px" if g.has_worker else "-"
    )
    return (
        g.node,
        str(g.gpu),
        f"{gpu_inventory.mb_to_gb(g.total_mb):.1f}",
        f"{gpu_inventory.mb_to_gb(g.used_mb):.1f}",
        f"{gpu_inventory.mb_to_gb(g.free_mb):.1f}",
        assigned,
        f"{gpu_inventory.mb_to_gb(g.left_mb):.1f}",
        g.note,
    )


def _summary(plan: gb.GpuPlan) -> list[str]:
    placed = ", ".join(f"{g.node} GPU {g.gpu}" for g in plan.workers) or "none"
    lines = [f"Workers: {len(plan.workers)} ({placed})."]
    for node in plan.nodes:
        if node.trial_gpu is None:
            lines.append(f"{node.node}: no GPU memory left for trials.")
        else:
            fits = node.gpu_mem_mb // footprints.REWARD_NET_TRAIN_MB
            lines.append(
                f"{node.node}: trials get GPU {node.trial_gpu}, {gb.GPU_MEM_RESOURCE}="
                f"{node.gpu_mem_mb} ({fits} reward-net trainings of "
                f"{footprints.REWARD_NET_TRAIN_MB} MB)."
            )
        env = " ".join(f"{k}={v}" for k, v in node.env().items())
        lines.append(
            f"{node.node}: Ray with {env} num_gpus={len(node.worker_gpus)} "
            f"resources={json.dumps({k: int(v) for k, v in node.ray_resources().items()})}"
        )
    return lines


def format_ray_start(plan: gb.GpuPlan) -> str:
    """One ``ray start`` line per node (add --head, or --address=HEAD:6379 on the others)."""
    lines = [
        "",
        "# Start Ray on each node with (add --head on the head node, else --address=HEAD:6379):",
    ]
    lines += [f"# {node.node}\n{node.ray_start_command()}" for node in plan.nodes]
    return "\n".join(lines)
