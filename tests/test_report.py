"""The evaluation and report of a real smoke run (the session's ``smoke_run`` fixture).

Checks the issue's "done when": every method on the same image ids, metrics in [0, 1], the
prompt oracle at least as good as every single-prompt method per image, CIs that contain their
means; that ``sa2va-rl report`` rebuilds every report file byte for byte from the saved files
(here in a moved copy of the run); that the plots are PNGs of their fixed size; and that Tune's
results compare the experiments' ``eval/*`` metrics as the report says.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import ray

from envs.datasets import load_dataset
from models.metrics import mask_metrics
from orchestrator import metric_keys as mk
from orchestrator.cli import EXIT_USER_ERROR, main
from orchestrator.evaluation.examples import example_mask_path, pick_examples, read_mask_png
from orchestrator.evaluation.methods import METHODS
from orchestrator.evaluation.per_image import read_rows
from orchestrator.evaluation.statistics import Estimate, summarise, verdict
from orchestrator.experiments import RL_METHODS
from orchestrator.report.markdown import TUNE_SNIPPET, render_report
from orchestrator.report.plots import PLOT_DPI, PLOT_SIZES
from orchestrator.report.record import TuneTrial, load_run
from orchestrator.run_dir import RunPaths
from orchestrator.training.reward_predictions import read_reward_net_predictions

SINGLE_PROMPT_METHODS = (
    "baseline",
    "best_fixed_prompt",
    "bandit_prompt",
    "supervised_prompt",
    "prompt_rl",
    "reward_rl",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(smoke_run: Any) -> RunPaths:
    assert smoke_run.exit_code == 0, "the smoke run failed: see its report.md"
    return RunPaths(smoke_run.root)


@pytest.fixture(scope="module")
def rows(run: RunPaths) -> list[dict[str, str]]:
    with run.per_image_csv.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def summary(run: RunPaths) -> dict[str, Any]:
    return json.loads(run.summary.read_text())


def _dice(rows: list[dict[str, str]], method: str) -> dict[str, float]:
    return {r["image_id"]: float(r["dice"]) for r in rows if r["method"] == method}


# --- evaluation ----------------------------------------------------------------------------------
def test_every_method_is_evaluated_on_the_same_images(rows: list[dict[str, str]]) -> None:
    ids = {m: sorted(r["image_id"] for r in rows if r["method"] == m) for m in METHODS}
    assert all(ids[m] for m in METHODS), f"a method is missing: {ids}"
    assert all(ids[m] == ids["baseline"] for m in METHODS)
    assert len(ids["baseline"]) == len(set(ids["baseline"])) == 6  # smoke: max_eval_images 6


def test_metrics_are_in_the_unit_interval(rows: list[dict[str, str]], summary: dict) -> None:
    for row in rows:
        for name in ("dice", "recall", "precision", "iou"):
            assert 0.0 <= float(row[name]) <= 1.0, row
    for method, m in summary["methods"].items():
        for name in ("dice", "recall", "precision", "iou"):
            assert 0.0 <= m[name] <= 1.0, method


def test_oracle_prompt_is_at_least_every_single_prompt_method(rows: list[dict[str, str]]) -> None:
    oracle = _dice(rows, "oracle_prompt")
    for method in SINGLE_PROMPT_METHODS:
        for image_id, dice in _dice(rows, method).items():
            assert oracle[image_id] >= dice, (method, image_id)


def test_oracle_postprocess_is_at_least_the_baseline_and_the_policy(
    rows: list[dict[str, str]],
) -> None:
    oracle = _dice(rows, "oracle_postprocess")
    # The op-sequence learners pick one of the sequences the oracle searches.
    for method in ("baseline", "postprocess_rl", "supervised_ops", "best_fixed_ops"):
        for image_id, dice in _dice(rows, method).items():
            assert oracle[image_id] >= dice, (method, image_id)


def test_summary_means_match_the_csv_and_cis_contain_them(
    rows: list[dict[str, str]], summary: dict
) -> None:
    assert list(summary["methods"]) == list(METHODS)
    for method, m in summary["methods"].items():
        per_image = [float(r["dice"]) for r in rows if r["method"] == method]
        assert m["n"] == len(per_image)
        assert m["dice"] == round(float(np.mean(per_image)), 6)
        for name in ("dice", "recall", "precision", "iou"):
            low, high = m["ci95"][name]
            assert low <= m[name] <= high, (method, name)
        for reference in ("baseline", "best_fixed_prompt"):
            for name, diff in m[f"vs_{reference}"].items():
                assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1], (method, name)


def test_paired_differences_are_the_mean_per_image_differences(
    rows: list[dict[str, str]], summary: dict
) -> None:
    base, fixed = _dice(rows, "baseline"), _dice(rows, "best_fixed_prompt")
    for method in METHODS:
        dice = _dice(rows, method)
        vs = summary["methods"][method]
        assert vs["vs_baseline"]["dice"]["mean"] == pytest.approx(
            np.mean([dice[i] - base[i] for i in base]), abs=1e-6
        )
        assert vs["vs_best_fixed_prompt"]["dice"]["mean"] == pytest.approx(
            np.mean([dice[i] - fixed[i] for i in fixed]), abs=1e-6
        )


def test_example_masks_are_the_final_masks_of_the_picked_images(
    run: RunPaths, rows: list[dict[str, str]]
) -> None:
    base = [r for r in read_rows(run.per_image_csv) if r.method == "baseline"]
    picks = sorted(set(pick_examples(base).values()))
    dataset = load_dataset(run.synthetic_data)
    directory = run.examples_dir
    saved = sorted(p.name for p in directory.iterdir())
    assert saved == sorted(example_mask_path(directory, m, i).name for m in METHODS for i in picks)
    for image_id in picks:
        gt = dataset.load(image_id).mask
        assert gt is not None
        for method, dice in ((m, _dice(rows, m)[image_id]) for m in METHODS):
            mask = read_mask_png(example_mask_path(directory, method, image_id))
            assert mask_metrics(mask, gt).dice == dice, (method, image_id)


def test_reward_net_predictions_are_the_ones_its_report_measured(run: RunPaths) -> None:
    saved = json.loads(run.reward_net_report.read_text())
    predictions = read_reward_net_predictions(run.reward_net_predictions)
    assert len(predictions.image_ids) == saved["n_val"]
    for j, name in enumerate(("dice", "recall", "precision")):
        mae = float(np.mean(np.abs(predictions.predicted[:, j] - predictions.true[:, j])))
        assert mae == pytest.approx(saved["targets"][name]["mae"], abs=1e-6)
        assert ((predictions.true[:, j] >= 0) & (predictions.true[:, j] <= 1)).all()


# --- report files --------------------------------------------------------------------------------
def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plots_are_pngs_of_their_fixed_size(run: RunPaths) -> None:
    assert sorted(p.name for p in run.plots.iterdir()) == sorted(PLOT_SIZES)
    for name, (w, h) in PLOT_SIZES.items():
        assert _png_size(run.plots / name) == (
            round(w * PLOT_DPI),
            round(h * PLOT_DPI),
        )


def _report_hashes(root: Path) -> dict[str, str]:
    files = [root / "summary.json", root / "report.md", *sorted((root / "plots").iterdir())]
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


def test_report_command_rebuilds_every_file_byte_identically(
    run: RunPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _report_hashes(run.root)
    copy = tmp_path / "moved-run"
    shutil.copytree(run.root, copy)
    # Only the run facts of summary.json are an input: its methods, report.md and the plots
    # are rebuilt.
    facts = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").write_text(json.dumps({**facts, "methods": {}}))
    (copy / "report.md").write_text("stale")
    shutil.rmtree(copy / "plots")
    assert main(["report", str(copy)]) == 0
    assert not ray.is_initialized()  # read from files: no cluster started
    assert "best_fixed_prompt" in capsys.readouterr().out
    assert _report_hashes(copy) == before


def test_report_refuses_a_run_that_did_not_finish(
    run: RunPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run.config, partial / "config.yaml")
    assert main(["report", str(partial)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"{partial / 'summary.json'} is missing" in err
    assert f"sa2va-rl run --output {partial} --resume" in err
    assert main(["report", str(tmp_path / "nowhere")]) == EXIT_USER_ERROR
    assert "does not exist" in capsys.readouterr().err
    for name in ("summary.json", "eval/per_image.csv"):
        (partial / name).parent.mkdir(exist_ok=True)
        shutil.copy(run.root / name, partial / name)
    assert main(["report", str(partial)]) == EXIT_USER_ERROR
    assert f"{partial / 'tune'} is missing (the Tune experiment)" in capsys.readouterr().err
    (partial / "summary.json").write_text("{not json")
    (partial / "tune").mkdir()
    assert main(["report", str(partial)]) == EXIT_USER_ERROR
    assert f"{partial / 'summary.json'} is not valid JSON" in capsys.readouterr().err


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_report_states_verdicts_that_match_the_summary(run: RunPaths, summary: dict) -> None:
    text = run.report.read_text()
    assert text.startswith("# sa2va-rl run: smoke mode, frangi backend\n")
    for method in METHODS[1:]:
        diff = summary["methods"][method]["vs_baseline"]["dice"]
        videos = summary["methods"][method]["videos"]
        estimate = Estimate(diff["mean"], *diff["ci95"], groups=videos)
        line = next(x for x in text.splitlines() if x.startswith(f"- {method}: "))
        assert re.match(
            rf"- {method}: [+-]\d\.\d{{3}} \[-?\d\.\d{{3}}, -?\d\.\d{{3}}\] Dice vs baseline — "
            rf"{re.escape(verdict(estimate))}( \(image-level [^)]*\))?; Recall ",
            line,
        ), line
    beats = _section(text, "Verdicts").split("best fixed prompt?**", 1)[1]
    for method in RL_METHODS:
        assert f"- {method} " in beats and "Dice vs best_fixed_prompt." in beats


def test_report_has_every_section_and_links_every_plot(run: RunPaths) -> None:
    text = run.report.read_text()
    for title in (
        "Results on the test split",
        "Verdicts",
        "Goal: Dice >= 0.85 and Recall >= 0.85",
        "Ceilings",
        "RL vs the baselines",
        "Learning diagnostics",
        "Reward network (experiment 3, step 1)",
        "Trials (Tune)",
        "Inference",
        "Wall time by stage",
        "Plots",
    ):
        assert f"\n## {title}\n" in text, title
    table = _section(text, "Results on the test split")
    assert all(f"| {m} | 6 | " in table for m in METHODS)
    for name in PLOT_SIZES:
        assert f"](plots/{name})" in text
    assert "| prompt_rl | " in _section(text, "Ceilings")
    assert "| prompt_rl | " in _section(text, "RL vs the baselines")
    diagnostics = _section(text, "Learning diagnostics")
    assert "Post-processing action set: project (dilate, erode," in diagnostics
    assert "Steps per episode: prompt 1, postprocess 3, reward_guided 1" in diagnostics
    assert "**prompt_rl**:" in diagnostics and "| train Dice | test Dice |" in diagnostics
    assert "| dice | " in _section(text, "Reward network (experiment 3, step 1)")
    assert str(run.root) not in text  # a moved run rebuilds to the same bytes


def test_report_says_plainly_which_trial_failed(run: RunPaths) -> None:
    record = load_run(run.root)
    failed = TuneTrial(
        "prompt",
        "ERROR",
        "tune/run_trial_x_prompt",
        "tune/run_trial_x_prompt/error.txt",
        pd.DataFrame(),
    )
    record = dataclasses.replace(
        record,
        trials=[failed, *(t for t in record.trials if t.name != "prompt")],
        rows=[r for r in record.rows if r.method not in ("prompt_rl", "combined")],
        facts={**record.facts, "trials": {**record.facts["trials"], "prompt": "ERROR"}},
    )
    summaries = summarise(record.rows)
    text = render_report(record, {**record.facts}, summaries, {})
    assert "- **Trial `prompt` failed** (ERROR): see `tune/run_trial_x_prompt/error.txt`." in text
    assert "- prompt_rl: not evaluated (trial `prompt` is ERROR, no policy)" in text
    assert "| prompt | ERROR | — | — | — | — |" in text


# --- Tune analysis -------------------------------------------------------------------------------
def test_tune_results_compare_eval_metrics_of_every_ppo_experiment(
    run: RunPaths, summary: dict
) -> None:
    from ray import tune

    grid = tune.ResultGrid(tune.ExperimentAnalysis(str(run.tune_dir)))
    df = grid.get_dataframe().set_index("config/trial")
    assert sorted(df.index) == [
        "combined",
        "postprocess",
        "prompt",
        "reward_finetune",
        "reward_guided",
        "reward_net",
        "supervised_finetune",
    ]
    for trial, method in {
        "prompt": "prompt_rl",
        "postprocess": "postprocess_rl",
        "reward_guided": "reward_rl",
        "combined": "combined",  # its own env (prompt policy's prompts) = the report's path
    }.items():
        for name in ("dice", "recall"):
            value = df.loc[trial, mk.EVAL_METRICS[name]]
            # The trial evaluated the same best policy on the same test images as the report.
            assert value == pytest.approx(summary["methods"][method][name], abs=1e-6)
    assert np.isnan(df.loc["reward_net", mk.EVAL_DICE])


def test_the_reports_tune_snippet_runs_in_the_run_directory(run: RunPaths) -> None:
    assert TUNE_SNIPPET in run.report.read_text()
    done = subprocess.run(
        [sys.executable, "-c", TUNE_SNIPPET],
        cwd=run.root,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert "eval/dice" in lines[0] and "eval/recall" in lines[0]
    assert sorted(line.split()[1] for line in lines[1:]) == [
        "combined",
        "postprocess",
        "prompt",
        "reward_guided",
    ]


def test_baselines_have_the_fields_of_every_method_and_learning_facts(
    run: RunPaths, summary: dict
) -> None:
    methods = summary["methods"]
    fields = set(methods["prompt_rl"])
    for method in ("bandit_prompt", "supervised_prompt", "supervised_ops", "best_fixed_ops"):
        assert set(methods[method]) == fields, method
        assert f"vs_{method}" in methods["prompt_rl"]
    learning = summary["learning"]
    assert learning["normalize_observations"] is True
    assert learning["episode_steps"] == {
        "prompt": 1,
        "postprocess": 3,
        "reward_guided": 1,
        "combined": 3,
    }
    assert learning["action_set"] == "project"
    train_rows = read_rows(run.train_per_image_csv)
    train = {r.method for r in train_rows}
    assert {"baseline", "prompt_rl", "postprocess_rl", "bandit_prompt", "supervised_ops"} <= train
    assert not any(m.startswith("oracle") for m in train)
    for method, share in learning["gap_closed"].items():
        oracle = "oracle_postprocess" if method in POST_METHODS else "oracle_prompt"
        base = methods["baseline"]["dice"]
        want = (methods[method]["dice"] - base) / (methods[oracle]["dice"] - base)
        assert share == pytest.approx(want, abs=1e-3), method
    prompt_hist = learning["action_histograms"]["prompt_rl"]
    assert sum(prompt_hist["test"].values()) == methods["prompt_rl"]["n"]
    assert sum(prompt_hist["train"].values()) == len({r.image_id for r in train_rows})


POST_METHODS = ("postprocess_rl", "combined", "supervised_ops", "best_fixed_ops")
