"""The config schema: composition of the shipped variants and errors that name the bad key."""

from pathlib import Path

import pytest
import yaml

from models.errors import UserError
from orchestrator.config import CONFIG_DIR, RunConfig, config_to_dict, load_config, parse_config


def test_variants_compose_base() -> None:
    smoke = load_config(CONFIG_DIR / "smoke.yaml")
    quick = load_config(CONFIG_DIR / "quick.yaml")
    full = load_config(CONFIG_DIR / "full.yaml")
    assert (smoke.mode, quick.mode, full.mode) == ("smoke", "quick", "full")
    # The original quick and full modes (SEEDS.md); quick trains on every training image.
    assert (quick.data.max_train_images, quick.ppo.total_env_steps, quick.ppo.num_envs) == (
        None,
        2000,
        2,
    )
    assert (full.data.max_train_images, full.ppo.total_env_steps, full.ppo.num_envs) == (
        100,
        10000,
        4,
    )
    # PPO hyper-parameters come from base.yaml in every variant: the original settings.
    for cfg in (smoke, quick, full):
        ppo = cfg.ppo
        assert (ppo.lr, ppo.gamma, ppo.gae_lambda, ppo.clip_param) == (3e-4, 0.99, 0.95, 0.2)
        assert (ppo.entropy_coeff, ppo.vf_loss_coeff, ppo.hidden) == (0.01, 0.5, (128, 64))
        assert cfg.experiments == ("prompt", "postprocess", "reward", "finetune")
    # smoke overrides the minibatch; quick and full keep the original 64.
    assert (smoke.ppo.minibatch_size, quick.ppo.minibatch_size) == (16, 64)


def test_every_shipped_file_validates() -> None:
    names = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert names == ["base.yaml", "full.yaml", "quick.yaml", "smoke.yaml"]
    for name in names:
        assert isinstance(load_config(CONFIG_DIR / name), RunConfig)


def test_errors_name_every_bad_key() -> None:
    with pytest.raises(UserError) as err:
        parse_config({"ppo": {"lr": -1, "bogus": 2}, "backend": {"name": "x"}, "zzz": 1})
    text = str(err.value)
    assert "key 'backend.name': got 'x', allowed: 'frangi' or 'sa2va'" in text
    assert "key 'ppo.lr': Input should be greater than 0 (got -1)" in text
    assert "unknown key 'ppo.bogus'; allowed here: total_env_steps" in text
    assert "unknown key 'zzz'; allowed here: mode, experiments" in text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"data": {"split_fractions": [0.5, 0.5, 0.5]}}, "summing to 1"),
        ({"ppo": {"minibatch_size": 512, "train_batch_size": 256}}, "must not exceed"),
        ({"env": {"default_prompt": "segment a cat"}}, "must be one of prompts"),
        ({"experiments": ["prompt", "dance"]}, "'experiments.1': got 'dance'"),
        ({"env": {"max_steps": 0}}, "key 'env.max_steps'"),
        ({"env": {"episode_steps": {"prompt": 0}}}, "episode_steps must be between 1 and 50"),
        (
            {"env": {"episode_steps": {"dance": 1}}},
            "got 'dance', allowed: 'prompt', 'postprocess', 'reward' or 'finetune'",
        ),
    ],
)
def test_cross_field_and_range_errors(data: dict, message: str) -> None:
    with pytest.raises(UserError, match="invalid config") as err:
        parse_config(data)
    assert message in str(err.value)


def test_extends_and_file_errors(tmp_path: Path) -> None:
    (tmp_path / "parent.yaml").write_text("ppo:\n  lr: 0.001\n  seed: 3\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\nppo:\n  seed: 7\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.ppo.lr, cfg.ppo.seed) == (0.001, 7)

    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "bad.yaml").write_text("ppo: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="not found; the shipped ones are in"):
        load_config(tmp_path / "missing.yaml")


def test_cpu_workers_auto_counts_the_cpus() -> None:
    from orchestrator.config import MAX_AUTO_CPU_WORKERS, cpu_worker_count

    assert load_config(CONFIG_DIR / "quick.yaml").workers.cpu_workers == "auto"
    assert [cpu_worker_count("auto", cpus) for cpus in (0.5, 1, 2, 2.5, 64)] == [
        1,
        1,
        2,
        2,
        MAX_AUTO_CPU_WORKERS,
    ]
    assert cpu_worker_count(3, 2) == 3  # a number is taken as given
    assert parse_config({"workers": {"cpu_workers": 3}}).workers.cpu_workers == 3
    for bad in (0, 65, "all", True):
        with pytest.raises(UserError, match=r"'workers.cpu_workers': use \"auto\" or a whole"):
            parse_config({"workers": {"cpu_workers": bad}})


def test_base_yaml_states_the_schema_defaults() -> None:
    """base.yaml spells out the defaults a user is most likely to change; a test keeps every
    value it names equal to the schema's default, so the two never drift apart."""
    written = yaml.safe_load((CONFIG_DIR / "base.yaml").read_text())
    defaults = config_to_dict(parse_config({}, source="defaults"))

    def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(leaves(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    base, schema = leaves(written), leaves(defaults)
    differs = {
        key: (value, schema.get(key))
        for key, value in base.items()
        if key != "extends" and _normal(value) != _normal(schema.get(key))
    }
    assert differs == {}


def _normal(value: object) -> object:
    return list(value) if isinstance(value, tuple | list) else value


def test_prompt_set_fills_prompts_and_default() -> None:
    from models.prompts import PROMPT_SETS

    seeds = parse_config({}, source="t")
    assert seeds.env.prompts == PROMPT_SETS["seeds"]
    assert seeds.env.default_prompt == "Please segment the blood vessel."
    clinical = parse_config({"env": {"prompt_set": "clinical"}}, source="t")
    assert clinical.env.prompts == PROMPT_SETS["clinical"]
    assert clinical.env.default_prompt == PROMPT_SETS["clinical"][0]
    # A resolved config (as saved in config.yaml) parses back to itself.
    assert parse_config(config_to_dict(clinical), source="t") == clinical
    own = parse_config({"env": {"prompts": ["segment a", "segment b"]}}, source="t")
    assert own.env.default_prompt == "segment a"
    assert parse_config(config_to_dict(own), source="t") == own
    with pytest.raises(UserError, match=r"give either prompt_set \('clinical'\) or your own"):
        parse_config({"env": {"prompt_set": "clinical", "prompts": ["a", "b"]}}, source="t")


def test_prompt_set_choices_are_the_named_sets() -> None:
    from typing import get_args

    from models.prompts import DEFAULT_PROMPT_SET, PROMPT_SETS
    from orchestrator.config import EnvConfig

    field = EnvConfig.model_fields["prompt_set"]
    assert set(get_args(field.annotation)) == set(PROMPT_SETS)
    assert field.default == DEFAULT_PROMPT_SET


def test_episode_shape_and_normalisation_keys() -> None:
    default = parse_config({})
    assert default.ppo.normalize_observations and default.ppo.normalization_steps == 512
    # One prompt decision per image; post-processing keeps max_steps (3).
    assert [default.env.steps_for(e) for e in ("prompt", "postprocess", "reward")] == [1, 3, 1]
    original = load_config(
        CONFIG_DIR / "quick.yaml", {"env": {"episode_steps": {"prompt": 3, "reward": 3}}}
    )
    assert [original.env.steps_for(e) for e in ("prompt", "postprocess", "reward")] == [3, 3, 3]
    bandit = parse_config({"env": {"max_steps": 2, "episode_steps": {"prompt": 1}}})
    assert [bandit.env.steps_for(e) for e in ("prompt", "postprocess", "reward")] == [1, 2, 2]
    raw = parse_config({"ppo": {"normalize_observations": False}})
    assert not raw.ppo.normalize_observations
