"""Config loading: unknown keys, dotted overrides, fire's type guesses, recipes, validation."""

import pytest

from ds_distill.config.load import from_dict, load_config
from ds_distill.config.run import RunConfig
from ds_distill.errors import ConfigError
from tests.conftest import translation_config, write_yaml


@pytest.fixture
def run_yaml(tmp_path, tiny):
    return write_yaml(tmp_path / "run.yaml", translation_config(tiny, tmp_path / "out"))


def test_yaml_and_dotted_overrides(run_yaml):
    run = load_config(str(run_yaml), overrides={"train.max_steps": 7, "losses.kd.temperature": 3})
    assert run.train.max_steps == 7
    assert run.losses["kd"]["temperature"] == 3
    assert run.student.init.from_teacher.d_model == 32


def test_unknown_key_names_the_valid_ones(run_yaml):
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step'. Did you mean 'max_steps'\?.*Valid keys: "):
        load_config(str(run_yaml), overrides={"train.max_step": 7})
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(str(run_yaml), overrides={"trian.max_steps": 7})


def test_fire_type_guesses_are_normalised_against_the_dataclass(run_yaml):
    # fire hands over `--data.prefix=1` as int, `--data.prefix=a,b` as a tuple, `--train.learning_rate=1` as int
    run = load_config(
        str(run_yaml),
        overrides={
            "data.prefix": 1,
            "train.learning_rate": 1,
            "train.bf16": "false",
            "data.source_lang": ("en", "fr"),
            "train.max_steps": "1e3",
        },
    )
    assert run.data.prefix == "1"
    assert run.train.learning_rate == 1.0 and isinstance(run.train.learning_rate, float)
    assert run.train.bf16 is False
    assert run.data.source_lang == "en,fr"
    assert run.train.max_steps == 1000


@pytest.mark.parametrize(
    "override, message",
    [
        ({"train.max_steps": 2.5}, "train.max_steps must be an integer"),
        ({"train.bf16": "maybe"}, "train.bf16 must be true or false"),
        ({"data.task": "qa"}, "data.task 'qa' is unknown"),
        ({"train.eval_metric": "meteor"}, "train.eval_metric 'meteor' is unknown"),
        ({"data.target_lang": None}, "needs data.source_lang and data.target_lang"),
        (
            {"student.model_name_or_path": "x"},
            "exactly one of student.model_name_or_path and student.init.from_teacher",
        ),
        ({"train.per_device_train_batch_size": 0}, "per_device_train_batch_size must be at least 1"),
        ({"train": 3}, "train must be a mapping"),
    ],
)
def test_bad_values_are_refused_with_the_fix(run_yaml, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(run_yaml), overrides=override)


def test_recipes_load_and_missing_ones_are_listed():
    run = load_config(recipe="flan_t5_3b_145m")
    assert run.teacher.model_name_or_path == "google/flan-t5-xl"
    with pytest.raises(ConfigError, match="no recipe named 'nope'. Available: flan_t5_3b_145m"):
        load_config(recipe="nope")
    with pytest.raises(ConfigError, match="either --config=FILE or --recipe=NAME"):
        load_config("a.yaml", "flan_t5_3b_145m")


def test_defaults_round_trip():
    assert from_dict(RunConfig, {}).train.output_dir == "runs/distill"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"train.logging_steps": 0}, "train.logging_steps must be at least 1"),
        ({"train.save_total_limit": 0}, "train.save_total_limit must be at least 1"),
        ({"train.max_steps": "2.5e0"}, "train.max_steps must be an integer"),
        ({"losses.kd.weight": "heavy"}, "losses.kd.weight must be a number"),
        ({"losses.kd": 3}, "losses.kd must be a mapping"),
    ],
)
def test_values_that_would_fail_late_are_refused_early(run_yaml, override, message):
    from ds_distill.objectives.registry import build_losses
    from tests.unit.test_losses import TEACHER_PRESENT

    with pytest.raises(ConfigError, match=message):
        run = load_config(str(run_yaml), overrides=override)
        build_losses(run.losses, TEACHER_PRESENT)


def test_lists_of_data_files_stay_lists(run_yaml):
    run = load_config(str(run_yaml), overrides={"data.data_files": {"train": ["a.jsonl", "b.jsonl"]}})
    assert run.data.data_files == {"train": ["a.jsonl", "b.jsonl"]}
