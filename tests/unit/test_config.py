"""Config loading: unknown keys, dotted overrides, fire's type guesses, recipes, validation."""

import os
import re
from pathlib import Path

import pytest
import yaml

from ds_distill.config.load import load_config, load_tree
from ds_distill.config.run import RunConfig
from ds_distill.config.typed import from_dict
from ds_distill.errors import ConfigError
from tests.conftest import run_cli, translation_config, write_yaml


@pytest.fixture
def run_yaml(tmp_path, tiny):
    return write_yaml(tmp_path / "run.yaml", translation_config(tiny, tmp_path / "out"))


def test_yaml_and_dotted_overrides(run_yaml):
    run = load_config(str(run_yaml), overrides={"train.max_steps": 7, "losses.kd.temperature": 3})
    assert run.train.max_steps == 7
    assert run.losses["kd"].options.temperature == 3
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
        ({"train.logging_steps": 0}, "train.logging_steps must be at least 1"),
        ({"train.save_total_limit": 0}, "train.save_total_limit must be at least 1"),
        ({"train.max_steps": "2.5e0"}, "train.max_steps must be an integer"),
        # the loss terms' options are typed as the config loads, not when the terms are built
        ({"losses.kd.weight": "heavy"}, "losses.kd.weight must be a number"),
        ({"losses.kd": 3}, "losses.kd must be a mapping"),
        ({"losses.kd.divergence": "kl"}, "losses.kd.divergence 'kl' is unknown; choose one of forward_kl"),
        ({"losses.kd.on_policy.fraction": 2}, "losses.kd.on_policy.fraction must lie between 0 and 1"),
        ({"losses.cka.dtype": "int8"}, "cka dtype 'int8' is unknown"),
        ({"losses.kl.weight": 1}, "unknown key 'losses.kl'. Valid keys: attention_kl"),
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


def test_lists_of_data_files_stay_lists(run_yaml):
    run = load_config(str(run_yaml), overrides={"data.data_files": {"train": ["a.jsonl", "b.jsonl"]}})
    assert run.data.data_files == {"train": [os.path.abspath("a.jsonl"), os.path.abspath("b.jsonl")]}


def students_tree(tmp_path, **students):
    tree = translation_config({"t5": tmp_path / "t5"}, tmp_path / "runs")
    return {**tree, "students": students}


def test_each_student_overrides_the_run_key_by_key_into_its_own_directory(tmp_path):
    from ds_distill.config.load import parse_students

    runs = parse_students(students_tree(
        tmp_path,
        small={"student": {"init": {"from_teacher": {"d_model": 16}}}},
        small_cka={"method": "cka", "train": {"learning_rate": 1e-4}},
    ))  # fmt: skip
    assert list(runs) == ["small", "small_cka"]
    small, cka = runs["small"], runs["small_cka"]
    assert small.train.output_dir == str(tmp_path / "runs" / "small")
    assert small.student.init.from_teacher.d_model == 16 and small.student.init.from_teacher.d_ff == 64  # kept
    assert cka.student.init.from_teacher.d_model == 32 and "cka" in cka.losses and "kd" in cka.losses
    assert cka.train.learning_rate == 1e-4 and small.train.learning_rate == 1e-3
    assert cka.train.max_steps == small.train.max_steps == 12


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"train": {"max_steps": 5}}, "students.b.train.max_steps: the students share batches, steps and checkpoints"),
        ({"train": {"per_device_train_batch_size": 2}}, "students.b.train.per_device_train_batch_size: the students"),
        ({"teacher": {"model_name_or_path": "x"}}, "students.b.teacher: one teacher pass and one batch stream"),
        ({"data": {"max_train_samples": 8}}, "students.b.data: one teacher pass"),
        ({"studnet": {}}, "unknown key 'students.b.studnet'. Did you mean 'student'?"),
        ({"train": {"learning_rate": "fast"}}, "students.b: train.learning_rate must be a number, got 'fast'"),
        ("small", "students.b must be a mapping of run sections"),
    ],
)
def test_a_student_entry_that_cannot_work_is_refused_by_name(tmp_path, entry, message):
    from ds_distill.config.load import parse_students

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_students(students_tree(tmp_path, a={}, b=entry))


def test_a_config_with_students_is_not_read_as_one_run(tmp_path):
    with pytest.raises(ConfigError, match="trains several students"):
        load_config(str(write_yaml(tmp_path / "s.yaml", students_tree(tmp_path, a={}))))


def test_a_student_that_fails_its_checks_stops_the_run_before_any_directory_or_weights(tiny, tmp_path):
    """Student b's loss options are wrong: refused by name while no student's output directory exists yet."""
    tree = translation_config(tiny, tmp_path / "runs")
    tree["students"] = {"a": {}, "b": {"losses": {"kd": {"divergence": "kl"}}}}
    result = run_cli("distill", f"--config={write_yaml(tmp_path / 's.yaml', tree)}")
    assert result.returncode == 2
    assert "students.b: losses.kd.divergence 'kl' is unknown" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_configs_relative_paths_are_read_from_its_folder_and_the_command_lines_from_the_working_directory(
    tmp_path, monkeypatch
):
    from ds_distill.config.paths import PROJECT_ROOT
    from ds_distill.config.run import to_yaml

    configs, work = tmp_path / "configs", tmp_path / "work"
    (configs / "sub").mkdir(parents=True)
    (configs / "tok").mkdir()
    work.mkdir()
    (configs / "base.yaml").write_text(
        "data: {task: causal_lm, dataset: json, tokenizer: tok,\n"
        "       data_files: {train: data/a.jsonl, validation: [data/b.jsonl, /abs/c.jsonl]}}\n"
        "train: {output_dir: runs/base, max_steps: 2}\n"
    )
    (configs / "sub" / "run.yaml").write_text(
        "base: ../base.yaml\n"
        "teacher: {model_name_or_path: google/flan-t5-small, cache: ../caches/c}\n"
        "student: {model_name_or_path: ./student, deepspeed_config: ds_configs/student_zero3.json}\n"
        "train: {output_dir: ~/runs/x}\n"
    )
    monkeypatch.chdir(work)
    run = load_config(str(Path("..") / "configs" / "sub" / "run.yaml"), overrides={"data.tokenized_path": "tok_out"})
    assert run.data.data_files == {  # the base's paths from the base's folder
        "train": str(configs / "data" / "a.jsonl"), "validation": [str(configs / "data" / "b.jsonl"), "/abs/c.jsonl"],
    }  # fmt: skip
    assert run.data.tokenizer == str(configs / "tok")  # exists beside the base: a path
    assert run.teacher.model_name_or_path == "google/flan-t5-small"  # no such path: a hub id
    assert run.teacher.cache == str(configs / "caches" / "c")
    assert run.student.model_name_or_path == str(configs / "sub" / "student")  # ./ makes it a path
    assert run.student.deepspeed_config == str(PROJECT_ROOT / "ds_configs" / "student_zero3.json")  # the project's
    assert run.train.output_dir == os.path.expanduser("~/runs/x")
    assert run.data.tokenized_path == str(work / "tok_out")  # an override: the working directory's

    # A run's saved config.yaml names its paths absolutely: read from its own folder it is the same run.
    saved = tmp_path / "elsewhere" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text(to_yaml(run))
    assert load_config(str(saved)) == run

    (work / "student2").mkdir()  # the working directory's, not the config's: said, not silently taken
    (configs / "sub" / "run.yaml").write_text("base: ../base.yaml\nstudent: {model_name_or_path: student2}\n")
    with pytest.raises(ConfigError, match=r"student.model_name_or_path student2: not found beside the config .*"
                                          r"configs/sub/student2.*read from its folder"):  # fmt: skip
        load_config(str(configs / "sub" / "run.yaml"))


def test_a_chains_and_a_cohorts_paths_are_read_from_their_yamls_folder(tmp_path, monkeypatch):
    from ds_distill.chain import load

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "chain.yaml").write_text(
        "output_dir: out\ndefaults: {data: {data_files: {train: t.jsonl}}}\n"
        "stages: [{name: a, student: {model_name_or_path: ./s}}]\n"
    )
    tree = load(str(tmp_path / "c" / "chain.yaml"), None, {})
    assert tree["output_dir"] == str(tmp_path / "c" / "out")
    assert tree["defaults"]["data"]["data_files"] == {"train": str(tmp_path / "c" / "t.jsonl")}
    assert tree["stages"][0]["student"]["model_name_or_path"] == str(tmp_path / "c" / "s")
    (tmp_path / "c" / "cohort.yaml").write_text("students: {a: {student: {model_name_or_path: ./a}}}\n")
    tree = load_tree(str(tmp_path / "c" / "cohort.yaml"))
    assert tree["students"]["a"]["student"]["model_name_or_path"] == str(tmp_path / "c" / "a")


def test_data_files_of_a_hub_dataset_and_urls_stay_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "hub.yaml").write_text(
        "data: {task: causal_lm, dataset: allenai/c4, data_files: {train: en/c4-train.0000*.json.gz}}\n"
    )
    (tmp_path / "c" / "url.yaml").write_text(
        "data: {task: causal_lm, dataset: json, data_files: {train: 'https://example.org/a.jsonl', validation: v.jsonl}}\n"
    )
    assert load_tree(str(tmp_path / "c" / "hub.yaml"))["data"]["data_files"] == {"train": "en/c4-train.0000*.json.gz"}
    files = load_tree(str(tmp_path / "c" / "url.yaml"))["data"]["data_files"]
    assert files == {"train": "https://example.org/a.jsonl", "validation": str(tmp_path / "c" / "v.jsonl")}
    run = load_config(str(tmp_path / "c" / "hub.yaml"), overrides={"student.model_name_or_path": "gpt2"})
    assert run.data.data_files == {"train": "en/c4-train.0000*.json.gz"}


def test_a_run_saved_with_relative_paths_is_the_same_run_with_them_absolute(tmp_path, monkeypatch):
    """A config.yaml saved before checked runs' paths were absolute (read from the working directory) compares
    equal to the same run now, so --resume and a chain's finished stages go on."""
    from ds_distill.config.run_dir import changed_keys

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jsonl").write_text("")
    saved = tmp_path / "config.yaml"
    saved.write_text("data: {dataset: json, data_files: {train: t.jsonl}}\ntrain: {output_dir: runs/x}\n")
    now = f"data: {{dataset: json, data_files: {{train: {tmp_path}/t.jsonl}}}}\ntrain: {{output_dir: {tmp_path}/runs/x}}\n"
    assert changed_keys(saved, now) == []
    assert [key for key, *_ in changed_keys(saved, now.replace("runs/x", "runs/y"))] == ["train.output_dir"]


def test_a_run_saved_with_only_the_loss_options_it_set_is_the_same_run_with_all_spelled_out(tmp_path):
    """config.yaml spells out every option of every loss term; one that names only those it set (an earlier
    version's) compares equal to it for --resume, and a chain's fingerprint of a stage is the same either way. A
    term at its defaults still counts: {ce, kd} is not {ce}."""
    from ds_distill.chain import settings
    from ds_distill.config.run import to_dict, to_yaml
    from ds_distill.config.run_dir import changed_keys

    short = {"ce": {"weight": 1.0}, "kd": {"weight": 0.5, "temperature": 2.0}}
    run = from_dict(RunConfig, {"losses": short, "train": {"output_dir": str(tmp_path / "r")}})
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump({"losses": short, "train": {"output_dir": str(tmp_path / "r")}}))
    full = yaml.safe_load(to_yaml(run))
    assert full["losses"]["kd"]["divergence"] == "forward_kl"  # every option written

    def changed_losses(now: str) -> list[str]:  # the saved file names nothing else
        return [key for key, *_ in changed_keys(saved, now) if key.startswith("losses")]

    assert changed_losses(to_yaml(run)) == []
    assert changed_losses(to_yaml(run).replace("temperature: 2.0", "temperature: 3.0")) == ["losses.kd.temperature"]
    assert settings({**to_dict(run), "losses": short}) == settings(to_dict(run))
    assert settings(to_dict(run))["losses"] == {"ce": {}, "kd": {"weight": 0.5, "temperature": 2.0}}
    ce_only = from_dict(RunConfig, {"losses": {"ce": {"weight": 1.0}}})
    ce_kd = from_dict(RunConfig, {"losses": {"ce": {"weight": 1.0}, "kd": {}}})
    assert settings(to_dict(ce_only)) != settings(to_dict(ce_kd))
