"""`ds-distill evaluate`: a model directory (or a run's checkpoints, exported first) scored on a split of a run's
data (train/scoring.py), under ZeRO-3 inference so a model too large for one device is partitioned over the
ranks; the report and the hypotheses and references written beside it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ds_distill import dist, models
from ds_distill.config.deepspeed import model_dtype
from ds_distill.config.run import RunConfig
from ds_distill.data import batches
from ds_distill.errors import ConfigError
from ds_distill.train import drafting
from ds_distill.train.scoring import score

DEFAULT_METRIC = {"translation": "bleu", "seq2seq": "rouge"}  # by data.task; other tasks: loss and perplexity


def model_directory(model: Path, output_dir: Path) -> Path:
    """A Hugging Face directory to load: `model` itself, or a run's checkpoints (`output_dir/checkpoints`, its
    newest complete one) exported to output_dir/model first, by rank 0."""
    from ds_distill.train import export

    if (model / "config.json").is_file():
        return model
    if not (model / export.TEMPLATE_DIR).is_dir():
        raise ConfigError(f"{model} is neither a model directory (config.json) nor a run's checkpoints directory")
    target = output_dir / "model"
    if dist.is_main():
        export.export_checkpoint(str(model), str(target), overwrite=False)
    dist.barrier()
    return target


def evaluate_model(
    model: str, run: RunConfig, output_dir: Path, split: str | None = None, deepspeed_config: str | None = None,
    draft_for: str | None = None, draft_prompts: int = drafting.PROMPTS,
) -> dict[str, float]:  # fmt: skip
    """Scores a model on a split of the run's data (default: its validation split) and writes
    output_dir/report.json with hypotheses.txt and references.txt (one line per example, in the data's order).

    The model loads under `deepspeed_config` (default: the run's teacher placement, ZeRO-3 inference), so a
    model too large for one device is partitioned over the ranks; generation keeps the ranks in step.
    `draft_for`: also the model as that target's speculative draft on the split's first `draft_prompts`
    prompts (train/drafting.py), measured on the main rank.
    """
    from datasets import DatasetDict
    from deepspeed.accelerator import get_accelerator

    from ds_distill.config import deepspeed as ds_config
    from ds_distill.data import tokenized as data
    from ds_distill.data import tokenizers
    from ds_distill.train.teacher import load_teacher

    dist.init(run.train.ddp_timeout)
    split = split or run.data.validation_split
    if split not in (run.data.train_split, run.data.validation_split):  # such as test: it plays validation
        run = dataclasses.replace(run, data=dataclasses.replace(run.data, validation_split=split))
    path = model_directory(Path(model), output_dir)
    tokenizer = tokenizers.load_tokenizer(str(path))
    model_config = models.load_config(str(path), "--model")
    if draft_for:  # refused before any weights load
        target_tokenizer = tokenizers.load_tokenizer(draft_for)
        drafting.check_pair(model_config, models.load_config(draft_for, "--draft_for"), tokenizer, target_tokenizer,
                            "--draft_for", conversations=bool(run.data.messages_field))  # fmt: skip
    raw = data.load_raw(run.data, need_train=False)
    if split not in raw:
        raise ConfigError(f"dataset '{run.data.dataset}' has no split '{split}' (it has {', '.join(raw)})")
    with dist.local_main_first():
        dataset = data.tokenize(run.data, tokenizer, DatasetDict({split: raw[split]}))[split]
    config_path = deepspeed_config or run.teacher.deepspeed_config
    placement = ds_config.fill_auto(
        ds_config.load_json(config_path), run.train, dist.world_size(), 1,
        get_accelerator().device_name() == "cpu", config_path,
    )  # fmt: skip
    engine = load_teacher(str(path), placement)
    texts: dict[str, list[str]] = {}
    collate = batches.make_collator(run.data, tokenizer, engine.module)
    synced = ds_config.zero_stage(placement) == 3
    results = score(engine.module, dataset, collate, tokenizer, run, synced_gpus=synced, texts=texts)
    engine.destroy()
    if draft_for and dist.is_main():
        prompts = drafting.draft_prompts(dataset, run.data, models.adapter_for(model_config).kind, draft_prompts)
        results.update(draft_metrics(str(path), draft_for, prompts, run, model_dtype(placement)))
    if dist.is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        for name in ("hypotheses", "references"):
            if name in texts:  # one example per line, whatever the model generated
                lines = (text.replace("\n", " ") for text in texts[name])
                (output_dir / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
        report = {
            "model": str(path.resolve()),
            "data": {"dataset": run.data.dataset, "data_files": run.data.data_files, "split": split},
            "examples": len(dataset),
            "generation": {"num_beams": run.train.num_beams, "max_new_tokens": run.train.generation_max_length},
            "metrics": results,
        }
        (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    dist.barrier()
    return results


def draft_metrics(draft: str, target: str, prompts: list[list[int]], run: RunConfig, dtype) -> dict[str, float]:
    """`draft` as `target`'s speculative draft (train/drafting.py): both loaded whole on this rank's device.
    `prompts`: tokenized by the draft's tokenizer."""
    from deepspeed.accelerator import get_accelerator

    from ds_distill.data.tokenizers import load_tokenizer

    device = get_accelerator().current_device_name()
    loaded = {}
    for role, path in (("draft", draft), ("target", target)):
        adapter = models.adapter_for(models.load_config(path, role))
        loaded[role] = adapter.from_pretrained(path, role, dtype=dtype).to(device).eval()
    tokenizers = load_tokenizer(target), load_tokenizer(draft)
    prompts = drafting.in_target_tokens(prompts, tokenizers[1], tokenizers[0])
    results = drafting.draft_scores(loaded["target"], loaded["draft"], prompts, run.train.generation_max_length,
                                    tokenizers[0].pad_token_id, tokenizers=tokenizers)  # fmt: skip
    dist.print_main(f"as the draft of {target}: {drafting.described(results)}")
    return results
