"""`ds-distill evaluate`: a model scored on a run's data."""

from __future__ import annotations

import os
from pathlib import Path

from ds_distill.errors import ConfigError


def evaluate(
    model: str,
    config: str | None = None,
    recipe: str | None = None,
    output_dir: str | None = None,
    split: str | None = None,
    metric: str | None = None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    deepspeed_config: str | None = None,
    draft_for: str | None = None,
    draft_prompts: int = 32,
    **overrides,
):
    """Scores a model on a run's data: loss, perplexity, token accuracy, and BLEU + chrF (translation) or ROUGE-L (seq2seq)
    of its generations against the raw reference texts (sacrebleu's own tokenisation).

        ds-distill evaluate --model=runs/145m/model --config=run.yaml --num_beams=4
        ds-distill evaluate --model=runs/145m/checkpoints --recipe=flan_t5_3b_145m --split=test
        ds-distill evaluate --model=runs/s/model --draft_for=TEACHER      # also as the teacher's speculative draft
        ds-distill evaluate --model=DIR --data.task=translation --data.dataset=json \
            --data.data_files.validation=valid.jsonl --data.source_lang=en --data.target_lang=de
        deepspeed --num_gpus 8 --module ds_distill evaluate --model=DIR --config=run.yaml   # ZeRO-3 over 8 GPUs

    Writes OUTPUT_DIR/report.json (metrics, model, data, generation settings), hypotheses.txt and
    references.txt (one line per example, in the data's order). A checkpoints directory is exported to
    OUTPUT_DIR/model first. The model loads as the run's teacher does (its DeepSpeed JSON: ZeRO-3 inference
    partitions a large model over the ranks, and generation keeps them in step).

    Args:
        model: a Hugging Face model directory or hub id, or a run's checkpoints directory.
        config: a run YAML whose data section (and train.generation_max_length, num_beams) to use; default:
            the run's own config.yaml, where --model is a run's model/ or checkpoints/ directory.
        recipe: a shipped recipe instead.
        output_dir: where the report goes; default: `eval` beside the model directory.
        split: the data split to score (default: data.validation_split).
        metric: bleu (with chrF) | rouge | accuracy | loss (loss, perplexity and token accuracy are always
            reported); default by data.task: translation bleu, seq2seq rouge, else loss.
        num_beams: beams for generation (default: train.num_beams).
        max_new_tokens: generation length limit (default: train.generation_max_length).
        batch_size: examples per rank per batch (default: train.per_device_eval_batch_size).
        deepspeed_config: where the model lives (default: teacher.deepspeed_config of the run).
        draft_for: a model (hub id or directory) to measure this one as the speculative-decoding draft of:
            Hugging Face assisted generation, greedy, on the split's first --draft_prompts prompts; reports the
            acceptance rate, accepted tokens per target step, the speed-up, and that the outputs equal the
            target's alone (train/drafting.py). Decoder-only or encoder-decoder pairs; a decoder with another
            tokenizer drafts through universal assisted decoding.
        draft_prompts: how many prompts the draft is measured on.
        **overrides: dotted flags such as --data.max_eval_samples=500.
    """
    import dataclasses

    from ds_distill.config.load import load_config
    from ds_distill.config.run import EVAL_METRICS
    from ds_distill.evaluation import DEFAULT_METRIC, evaluate_model
    from ds_distill.train.scoring import described

    if not (config or recipe):
        saved = Path(model.rstrip("/")).parent / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--model {model} is not a run's model/ or checkpoints/ directory (no {saved}); give "
                              "--config=RUN.yaml or --recipe=NAME for its data")  # fmt: skip
        config = str(saved)
        if os.environ.get("RANK", "0") == "0":  # (before the process group: every rank would say it)
            print(f"data and settings from {saved}")
    run = load_config(config, recipe, overrides)
    metric = metric or DEFAULT_METRIC.get(run.data.task, "loss")
    if metric not in EVAL_METRICS:
        raise ConfigError(f"metric '{metric}' is unknown; choose one of {', '.join(EVAL_METRICS)}")
    chosen = {"eval_metric": metric, "num_beams": num_beams, "generation_max_length": max_new_tokens,
              "per_device_eval_batch_size": batch_size}  # fmt: skip
    run = dataclasses.replace(run, train=dataclasses.replace(
        run.train, **{k: v for k, v in chosen.items() if v is not None}
    ))  # fmt: skip
    target = Path(output_dir) if output_dir else Path(model.rstrip("/")).parent / "eval"
    results = evaluate_model(model, run, target, split, deepspeed_config, draft_for, int(draft_prompts))
    from ds_distill import dist

    dist.print_main(f"{described(results)}; report in {target}")
