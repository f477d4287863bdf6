"""The report's learning diagnostics from hand-made per-image rows: exact histograms, gap
shares against each method family's oracle, train vs test Dice and the RL-vs-baselines table."""

from __future__ import annotations

from orchestrator.config import parse_config
from orchestrator.evaluation.per_image import ImageResult
from orchestrator.evaluation.statistics import summarise
from orchestrator.report import learning


def _row(method: str, image: str, dice: float, detail: str = "") -> ImageResult:
    return ImageResult(method, image, dice, dice, dice, dice, detail)


DICE = {
    "baseline": (0.70, 0.70, 0.70),
    "oracle_prompt": (0.80, 0.80, 0.80),
    "oracle_postprocess": (0.90, 0.90, 0.90),
    "prompt_rl": (0.76, 0.74, 0.75),
    "postprocess_rl": (0.72, 0.72, 0.72),
    "supervised_ops": (0.80, 0.80, 0.80),
}
ACTIONS = {"prompt_rl": ("b", "c", "b"), "postprocess_rl": ("dilate > stop", "stop", "stop")}
TEST = [
    _row(m, f"img{i}", d, ACTIONS.get(m, ("",) * 3)[i])
    for m, values in DICE.items()
    for i, d in enumerate(values)
]
TRAIN = [_row("baseline", "t0", 0.75), _row("prompt_rl", "t0", 0.9, "c")]


def test_histograms_most_frequent_first() -> None:
    assert learning.histogram(TEST, "prompt_rl") == [("b", 2), ("c", 1)]
    assert learning.histogram(TEST, "postprocess_rl") == [("stop", 2), ("dilate > stop", 1)]
    assert learning.histogram(TRAIN, "postprocess_rl") == []


def test_gap_shares_use_each_familys_oracle() -> None:
    shares = learning.gap_closed(summarise(TEST))
    assert shares["prompt_rl"] == 0.5  # (0.75 - 0.70) / (0.80 - 0.70)
    assert shares["postprocess_rl"] == 0.1  # (0.72 - 0.70) / (0.90 - 0.70)
    assert shares["supervised_ops"] == 0.5
    assert "baseline" not in shares and "oracle_prompt" not in shares


def test_learning_json_and_sections() -> None:
    config = parse_config({"mask_ops": {"action_set": "original"}})
    summaries = summarise(TEST, references=("baseline", "supervised_ops"))
    facts = learning.learning_json(config, summaries, TRAIN, TEST)
    assert facts["train_dice"] == {"prompt_rl": 0.9}
    assert facts["action_set"] == "original" and facts["ops"][0] == "lower_threshold"
    assert facts["action_histograms"]["prompt_rl"] == {"train": {"c": 1}, "test": {"b": 2, "c": 1}}
    text = learning.render(config, summaries, TRAIN, TEST)
    assert "| prompt_rl | 50% | +0.050 [" in text
    assert "better | -0.050 [" in text  # prompt_rl is worse than supervised_ops: 0.75 vs 0.80
    assert "| prompt_rl | 0.900 | 0.750 | +0.150 |" in text
    assert "Post-processing action set: original (lower_threshold, dilate_3," in text
