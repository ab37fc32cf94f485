"""Bad input is refused with one line naming the problem and the fix, before any weights load."""

import json
import shutil

import pytest

from ds_distill.config.run import RunConfig
from ds_distill.config.typed import from_dict
from ds_distill.errors import ConfigError
from ds_distill.train.prepare import prepare
from tests import tiny_models
from tests.conftest import translation_config


def run_config(tiny, tmp_path, **sections):
    return from_dict(RunConfig, translation_config(tiny, tmp_path / "out", **sections))


def test_a_good_config_prepares(tiny, tmp_path):
    prepared = prepare(run_config(tiny, tmp_path))
    assert prepared.total_steps == 12
    assert prepared.student_ds["train_batch_size"] == 8
    assert set(prepared.datasets) == {"train", "validation"}
    assert prepared.student_config.d_model == 32


def test_missing_data_file(tiny, tmp_path):
    files = {"train": str(tmp_path / "missing.jsonl")}
    with pytest.raises(ConfigError, match="data.data_files.train: file .*missing.jsonl does not exist"):
        prepare(run_config(tiny, tmp_path, data={"data_files": files, "validation_split": None}))


def test_empty_dataset(tiny, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("en,de\n")
    with pytest.raises(ConfigError, match="dataset 'csv' is empty"):
        prepare(
            run_config(
                tiny, tmp_path, data={"dataset": "csv", "data_files": {"train": str(empty)}, "validation_split": None}
            )
        )


def test_missing_text_field(tiny, tmp_path):
    with pytest.raises(ConfigError, match="split 'train' has no field 'document'"):
        prepare(
            run_config(tiny, tmp_path, data={"task": "seq2seq", "source_field": "document", "target_field": "summary"})
        )


def test_wrong_language(tiny, tmp_path):
    with pytest.raises(ConfigError, match="translation pairs have languages en, de, not 'es'"):
        prepare(run_config(tiny, tmp_path, data={"target_lang": "es"}))


def test_task_that_does_not_fit_the_model(tiny, tmp_path):
    with pytest.raises(ConfigError, match="data.task 'causal_lm' does not fit a seq2seq student"):
        prepare(run_config(tiny, tmp_path, data={"task": "causal_lm"}))


def test_tokenizer_mismatch(tiny, tmp_path):
    other = tmp_path / "other_student"
    shutil.copytree(tiny["t5"], other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"][10][0] = "\u2581renamed"  # one piece differs: ids no longer mean the same text
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ConfigError, match="the teacher's tokenizer .* and the student's .* differ"):
        prepare(run_config(tiny, tmp_path, student={"init": {}, "model_name_or_path": str(other)}))


def test_missing_model_path(tiny, tmp_path):
    with pytest.raises(ConfigError, match="teacher.model_name_or_path '/no/teacher' is neither"):
        prepare(run_config(tiny, tmp_path, teacher={"model_name_or_path": "/no/teacher"}))


def test_output_dir_clash(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ds_distill_run.json").write_text("{}")
    (out / "config.yaml").write_text("something else")
    with pytest.raises(ConfigError, match="already holds a run with a different config; pass --resume .* --overwrite"):
        prepare(run_config(tiny, tmp_path))
    assert prepare(run_config(tiny, tmp_path), overwrite=True).resumes is False
    assert not (out / "config.yaml").exists()


def test_resume_without_checkpoint(tiny, tmp_path):
    with pytest.raises(ConfigError, match="--resume: no complete checkpoint"):
        prepare(run_config(tiny, tmp_path), resume=True)


def test_too_few_examples_for_one_batch(tiny, tmp_path):
    with pytest.raises(ConfigError, match="fewer than one batch of 4"):
        prepare(run_config(tiny, tmp_path, data={"max_train_samples": 3}))


def test_overwrite_deletes_nothing_when_a_check_fails(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("an earlier run")
    with pytest.raises(ConfigError, match="DeepSpeed config ds_configs/nope.json does not exist"):
        prepare(run_config(tiny, tmp_path, student={"deepspeed_config": "ds_configs/nope.json"}), overwrite=True)
    assert (out / "config.yaml").read_text() == "an earlier run"


def test_bare_encoder_teacher_cannot_give_logits(tiny, tmp_path):
    with pytest.raises(ConfigError, match="the teacher has no LM head"):
        prepare(
            run_config(
                tiny,
                tmp_path,
                teacher={"model_name_or_path": str(tiny["bert_bare"])},
                student={"init": {}, "model_name_or_path": str(tiny["bert"])},
                data={"task": "masked_lm", "dataset": "text", "data_files": tiny["text"]},
            )
        )


def test_generation_metrics_need_a_seq2seq_model(tiny, tmp_path):
    with pytest.raises(ConfigError, match="train.eval_metric 'bleu' needs a seq2seq model"):
        prepare(
            run_config(
                tiny,
                tmp_path,
                teacher={"model_name_or_path": str(tiny["gpt2"])},
                student={"init": {"from_teacher": {"decoder_layers": 1}}},
                data={"task": "causal_lm", "dataset": "text", "data_files": tiny["text"]},
                train={"eval_metric": "bleu"},
            )
        )


def test_without_a_validation_split_it_trains_without_evaluation_and_says_so(tiny, tmp_path, capsys):
    train_only = {"train": str(tiny_models.SHARED_DATA / "train.jsonl")}
    prepared = prepare(run_config(tiny, tmp_path, data={"data_files": train_only}))
    assert prepared.validation_split is None and set(prepared.datasets) == {"train"}
    assert "has no split 'validation': training without evaluation" in capsys.readouterr().out


def test_validation_split_percentage_holds_out_the_first_rows_of_train(tiny, tmp_path):
    train_only = {"train": str(tiny_models.SHARED_DATA / "train.jsonl")}
    data = {"data_files": train_only, "validation_split_percentage": 10, "max_train_samples": None}
    prepared = prepare(run_config(tiny, tmp_path, data=data))
    assert (len(prepared.datasets["validation"]), len(prepared.datasets["train"])) == (900, 8100)
    first = json.loads(open(train_only["train"]).readline())["translation"]["de"]
    assert prepared.datasets["validation"][0]["reference"] == first


def test_a_loading_script_dataset_is_one_clear_line(tiny, tmp_path, monkeypatch):
    import datasets

    def refuse(*args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found wmt13.py")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(
        ConfigError, match="is a loading script, which datasets >= 4 does not run: .*refs/convert/parquet"
    ):
        prepare(run_config(tiny, tmp_path, data={"dataset": "vgaraujov/wmt13", "data_files": None}))


def test_prepared_data_is_loaded_as_prepared_and_other_settings_are_refused(tiny, tmp_path, monkeypatch):
    from ds_distill.data import tokenized as data
    from tests.conftest import run_verb, write_yaml

    tokenized_path = tmp_path / "tokenized"
    config = translation_config(tiny, tmp_path / "out", data={"tokenized_path": str(tokenized_path)})
    result = run_verb("prepare_data", f"--config={write_yaml(tmp_path / 'run.yaml', config)}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train: 512 rows" in result.stdout and (tokenized_path / data.PREPARED_MARKER).is_file()

    monkeypatch.setattr(data, "load_raw", lambda *args: pytest.fail("prepared data must not be loaded again"))
    prepared = prepare(from_dict(RunConfig, config))
    assert len(prepared.datasets["train"]) == 512 and prepared.datasets["validation"][0]["reference"]

    config["data"]["max_source_length"] = 32
    with pytest.raises(ConfigError, match="was prepared with other settings \\(max_source_length differ"):
        prepare(from_dict(RunConfig, config))
