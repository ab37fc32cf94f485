"""The command line: launcher flags, help for every verb, clean errors, parameter counts of the recipes."""

import os

import pytest

from ds_distill import cli
from ds_distill.errors import ConfigError
from tests.conftest import run_cli, run_verb


def test_launcher_local_rank_flag_is_removed(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cli.strip_launcher_flags(["--local_rank=1", "distill", "--config=a.yaml"]) == ["distill", "--config=a.yaml"]
    assert cli.strip_launcher_flags(["distill", "--local_rank", "3", "--x=1"]) == ["distill", "--x=1"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["make_student", "--teacher=t"], "ds-distill make_student needs --output_dir=..."),
        (
            ["export", "--checkpoint_dir=c", "--output_dir=o", "--tagg=x"],
            "ds-distill export has no flag --tagg. Did you mean --tag?",
        ),
        (
            ["distill", "--config=c.yaml", "--overwite"],
            "ds-distill distill has no flag --overwite. Did you mean --overwrite?",
        ),
        (["export", "c", "o", "t", "false", "extra"], "ds-distill export does not take 'extra'"),
        (["count_params", "--recipes=flan_t5_3b_145m"], "ds-distill count_params has no flag --recipes. Did you mean"),
    ],
)
def test_command_line_mistakes_are_one_line_errors_with_the_verbs_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    error = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2
    assert error[0] == f"error: {message}" or error[0].startswith(f"error: {message}")
    assert error[1].startswith(f"usage: ds-distill {argv[0]} ") and len(error) == 2  # not fire's trace


def test_count_params_takes_the_recipe_as_a_flag_or_a_name(capsys):
    cli.main(["count_params", "--recipe=flan_t5_3b_145m"])
    as_flag = capsys.readouterr().out
    cli.main(["count_params", "flan_t5_3b_145m"])
    assert as_flag == capsys.readouterr().out and "19.5x smaller" in as_flag
    with pytest.raises(SystemExit):
        cli.main(["count_params"])
    assert "give one of: a model path or hub id, --recipe=NAME or --config=RUN.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_every_verb_has_help(verb, capsys):
    cli.main([verb, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ds-distill {verb}")
    assert len(out.splitlines()) >= 3


def test_top_level_help_lists_verbs(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(verb in out for verb in cli.VERBS)
    summaries = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert summaries["chain"].endswith("(or the source its student is cut from).")  # whole sentences
    assert summaries["plan"].endswith("and the overrides that select it.")


def test_no_verb_a_mistyped_verb_the_version_and_usage_lines(capsys):
    from ds_distill import __version__

    for argv, hint in (([], "usage: ds-distill VERB"), (["distil"], "error: unknown verb 'distil'; did you mean 'distill'?")):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2 and capsys.readouterr().err.startswith(hint)
    cli.main(["--version"])
    assert capsys.readouterr().out == f"ds-distill {__version__}\n"
    assert cli.verb_usage("distill") == (
        "usage: ds-distill distill [--config=PATH] [--recipe=NAME] [--resume] [--overwrite] [--SECTION.KEY=VALUE ...]"
    )
    assert "[--gpu_memory_gb=80.0]" in cli.verb_usage("plan") and "--model=DIR" in cli.verb_usage("evaluate")


def test_count_params_takes_dotted_overrides_and_says_larger_where_the_student_is(capsys):
    cli.main(["count_params", "--recipe=flan_t5_3b_145m", "--student.init.from_teacher.d_model=640"])
    narrower = capsys.readouterr().out
    cli.main(["count_params", "--recipe=flan_t5_3b_145m"])
    assert narrower != capsys.readouterr().out and "x smaller" in narrower
    wider = [f"--student.init.from_teacher.{key}" for key in ("d_model=4096", "d_ff=10240", "num_heads=64",
                                                              "encoder_layers=24", "decoder_layers=24")]  # fmt: skip
    cli.main(["count_params", "--recipe=flan_t5_3b_145m", *wider])
    assert "x larger than the teacher)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "chain, message",
    [
        ({"stages": [{"name": "a"}]}, "a chain needs output_dir"),
        ({"output_dir": "x", "stages": []}, "stages: must list at least one stage"),
        ({"output_dir": "x", "stages": [{"name": "a"}, {"name": "a"}]}, "stage name 'a' must be unique"),
        ({"output_dir": "x", "stages": [{"name": "a", "teacher_from": "b"}, {"name": "b"}]},
         "stage a: teacher_from 'b' is not an earlier stage"),
        ({"output_dir": "x", "stages": [{"name": "a"}], "default": {}}, "unknown chain key(s) default"),
        ({"output_dir": "x", "stages": [{"name": "a", "students": {"s": {}, "t": {}}}, {"name": "b"}]},
         "stage b: teacher_from 'a' trains several students; name one (a/s, a/t)"),
        ({"output_dir": "x", "stages": [{"name": "a", "students": {"s": {}}}, {"name": "b", "teacher_from": "a/u"}]},
         "stage b: teacher_from 'a/u' is not an earlier stage (a/s)"),
        ({"output_dir": "x", "stages": [{"name": "a"}]}, "stage a: data.dataset is missing"),
        ({"output_dir": "x", "defaults": {"data": {"task": "causal_lm", "dataset": "json", "data_files": {"train": "t"}},
                                        "student": {"model_name_or_path": "s"}},
          "stages": [{"name": "a"}, {"name": "b", "student_from": "a"}]},
         "stage b: student_from needs student.init.from_teacher.strategy: sliced"),
    ],
)  # fmt: skip
def test_bad_chains_are_refused_before_anything_runs(tmp_path, chain, message):
    from ds_distill import chain as chain_module

    with pytest.raises(ConfigError) as error:
        output_dir, stages = chain_module.parse(chain)
        for stage in stages:
            chain_module.resolve_units(stage, output_dir)
    assert message in str(error.value)


def test_chain_refuses_a_run_config_and_evaluate_a_directory_that_is_no_model(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(
        "data: {task: causal_lm, dataset: json, data_files: {train: t.jsonl}}\nstudent: {model_name_or_path: s}\n"
    )
    result = run_verb("chain", f"--config={run}")
    assert result.returncode == 2 and "is a run config, not a chain (no stages:)" in result.stderr
    result = run_cli("evaluate", f"--model={tmp_path}", f"--config={run}")
    assert result.returncode == 2
    assert "is neither a model directory (config.json) nor a run's checkpoints directory" in result.stderr
    result = run_verb("evaluate", f"--model={tmp_path / 'model'}")  # no --config, and no run's config.yaml there
    assert (
        result.returncode == 2 and f"is not a run's model/ or checkpoints/ directory (no {run.parent}" in result.stderr
    )


def test_count_params_prints_every_stage_of_the_chain_recipe():
    result = run_verb("count_params", "flan_t5_3b_chain")
    assert result.returncode == 0, result.stderr
    assert "stage l12:" in result.stdout and "stage l6:" in result.stdout
    assert "teacher stage l12: 424.5M parameters" in result.stdout
    assert "chain: 2,849.8M -> 148.5M parameters (19.2x smaller)" in result.stdout


def test_config_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian: {max_steps: 3}\n")
    result = run_verb("distill", f"--config={bad}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown key 'trian'. Did you mean 'train'? Valid keys: method, teacher, student, data, layer_map, losses, train, prune"
    ]


# Flan-T5-XL -> the DESIGN's student sizes, counted on the meta device from the shipped teacher config.
@pytest.mark.parametrize(
    "recipe, millions",
    [("flan_t5_3b_145m", 145), ("flan_t5_3b_250m", 250), ("flan_t5_3b_425m", 425), ("flan_t5_3b_780m", 780)],
)
def test_recipe_students_are_within_three_percent_of_their_size(recipe, millions, capsys):
    cli.main(["count_params", recipe])
    out = capsys.readouterr().out
    teacher = float(out.splitlines()[0].split(": ")[1].split("M")[0].replace(",", ""))
    student = float(out.splitlines()[1].split(": ")[1].split("M")[0].replace(",", ""))
    assert teacher == pytest.approx(2849.8, abs=0.1)  # Flan-T5-XL with its separate LM head
    assert student == pytest.approx(millions, rel=0.03)


def test_the_table_recipe_trains_the_four_recipe_students_with_kd_and_with_cka(capsys):
    """flan_t5_3b_table: seed 000's eight students, each the size and method of its own recipe."""
    from ds_distill.config.load import load_config, load_tree, parse_students

    cli.main(["count_params", "flan_t5_3b_table"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("teacher google/flan-t5-xl") and len(lines) == 9
    runs = parse_students(load_tree(recipe="flan_t5_3b_table"))
    for size in ("145m", "250m", "425m", "780m"):
        alone = load_config(recipe=f"flan_t5_3b_{size}")
        kd, cka = runs[f"s{size}"], runs[f"s{size}_cka"]
        assert kd.student.init == cka.student.init == alone.student.init
        assert kd.train.learning_rate == alone.train.learning_rate
        assert set(kd.losses) == {"ce", "kd"} and set(cka.losses) == set(alone.losses) == {"ce", "kd", "cka"}
        assert cka.train.output_dir == os.path.abspath(f"runs/flan_t5_3b_table/s{size}_cka")


# HomoDistil's widths from BERT-base, against the paper's sizes (65M, 17.3M, 15.6M, 14.1M).
@pytest.mark.parametrize(
    "recipe, millions",
    [("homobert_base", 65), ("homobert_small", 17.3), ("homobert_xsmall", 15.6), ("homobert_tiny", 14.1)],
)
def test_homobert_recipes_export_the_papers_sizes(recipe, millions, capsys):
    cli.main(["count_params", recipe])
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("student after pruning (the export)")
    assert float(last.split(": ")[1].split("M")[0]) == pytest.approx(millions, rel=0.03)


def test_list_shows_recipes_methods_losses_strategies_and_families(capsys):
    from ds_distill.config.losses import DIVERGENCES
    from ds_distill.config.methods import METHODS
    from ds_distill.objectives.registry import LOSSES

    cli.main(["list"])
    lines = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    expected = {"flan_t5_3b_145m", *METHODS, *LOSSES, "uniform", "last", "explicit", "t5", "student_zero3.json",
                *DIVERGENCES}  # fmt: skip
    assert expected <= set(lines)


def test_keys_lists_every_run_config_key_with_its_type_default_and_docstring(capsys):
    import dataclasses

    from ds_distill.config.losses import KDOptions
    from ds_distill.config.run import DataConfig, TrainConfig

    cli.main(["keys"])
    everything = capsys.readouterr().out
    listed = [line.split(":")[0] for line in everything.splitlines() if not line.startswith(" ")]
    for section, config in (("data", DataConfig), ("train", TrainConfig), ("losses.kd", KDOptions)):
        assert {f"{section}.{field.name}" for field in dataclasses.fields(config)} <= set(listed)
    assert len(listed) == len(set(listed))
    cli.main(["keys", "train"])
    train = capsys.readouterr().out.splitlines()
    assert all(line.startswith(("train:", "train.", "    ")) for line in train) and train[0] == "train: TrainConfig"
    max_steps = train.index("train.max_steps: int = -1")
    assert train[max_steps + 1] == "    Optimizer steps. -1: derive from num_train_epochs."
    cli.main(["keys", "student.init.from_teacher"])
    assert "student.init.from_teacher.tokenizer: str | None = None" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["keys", "trian"])
    assert "error: no run-config key starts with 'trian'; did you mean train?" in capsys.readouterr().err
