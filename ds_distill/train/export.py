"""Student weights out of DeepSpeed into a Hugging Face directory that `from_pretrained` loads.

Two routes: from a live engine at the end of a run (ZeRO-3 shards gathered one parameter at a time, so no
rank needs more than one extra full tensor), and from a saved checkpoint with DeepSpeed's
`zero_to_fp32` (works for ZeRO-2 and ZeRO-3 without starting a process group)::

    ds-distill export --checkpoint_dir=runs/x/checkpoints --output_dir=runs/x/exported
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from ds_distill import dist, models
from ds_distill.config import run_dir
from ds_distill.errors import ConfigError
from ds_distill.train.checkpoint import complete_tags, extra_state, latest_tag

STUDENT_PREFIX = "student."
TEMPLATE_DIR = "student_template"
PRUNED_FROM = "pruned_from"  # in the template of a HomoDistil run: the full-width student's config


def gather_student_state(engine) -> dict[str, torch.Tensor] | None:
    """The student's full state dict on rank 0 (None elsewhere); collective, every rank must call it.

    Trained parameters come from the optimizer's fp32 master copy, so a bf16 run exports the same weights as
    `ds-distill export` of its checkpoint; ZeRO-3 shards are gathered one tensor at a time.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, tensor in engine.module.student.state_dict(keep_vars=True).items():
        full = safe_get_full_fp32_param(tensor) if tensor.requires_grad else None
        if full is None and hasattr(tensor, "ds_id"):  # a frozen ZeRO-3 partition
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                full = tensor.detach().clone()
        if full is None:
            full = tensor.detach()
        if dist.is_main():
            state[name] = full.cpu().clone()
    return state if dist.is_main() else None


def generation_config(source: str | None, student_config: PretrainedConfig, tokenizer_size: int) -> GenerationConfig:
    """The student's generation settings: those `source` (the teacher, a hub id or a directory) ships, else the
    student config's own; ids past the tokenizer (a padded embedding: T5 has 32128 rows for 32100 tokens) are
    never generated."""
    config = None
    if source:
        try:
            config = GenerationConfig.from_pretrained(source)
        except OSError:  # the model ships none
            config = None
    if config is None:
        config = GenerationConfig.from_model_config(student_config)
    padded = range(tokenizer_size, student_config.vocab_size)
    if padded:
        config.suppress_tokens = sorted(set(config.suppress_tokens or []) | set(padded))
    return config


def save_template(
    output_dir: Path, hf_config: PretrainedConfig, tokenizer, generation_config, pruned_from: PretrainedConfig | None
) -> None:
    """What a Hugging Face directory needs besides weights, written once at the start of a run. A pruning run
    exports the config of the pruned widths and keeps the full student's beside it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(output_dir)
    if pruned_from is not None:
        pruned_from.save_pretrained(output_dir / PRUNED_FROM)
    tokenizer.save_pretrained(output_dir)
    generation_config.save_pretrained(output_dir)


def save_hf_model(
    state: dict[str, torch.Tensor], template_dir: Path, output_dir: Path, provenance: dict[str, Any]
) -> None:
    """Writes config, safetensors weights, tokenizer, generation config and `EXPORT_MARKER` (with `provenance`);
    the directory appears whole or not at all. The caller has checked that `output_dir` may be replaced."""
    hf_config = AutoConfig.from_pretrained(template_dir)
    model = models.adapter_for(hf_config).from_config(hf_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A missing key is fine only when it names a tensor that is shared with a loaded one (tied embeddings).
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in missing if not (k in params and id(params[k]) in loaded)]
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint does not fit the student config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with models.quiet_saving():
        model.save_pretrained(staging, safe_serialization=True)
    for item in template_dir.iterdir():
        if (
            item.is_file()
            and item.name not in ("config.json", "model.safetensors")
            and not (staging / item.name).exists()
        ):
            shutil.copy2(item, staging / item.name)
    if (template_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(template_dir).save_pretrained(staging)
    (staging / run_dir.EXPORT_MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
    run_dir.replace_directory(staging, output_dir)


def export_checkpoint(checkpoint_dir: str, output_dir: str, tag: str | None = None, overwrite: bool = False) -> Path:
    """ZeRO checkpoint (any stage) -> Hugging Face directory, on one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, target = Path(checkpoint_dir), Path(output_dir)
    template = root / TEMPLATE_DIR
    if not template.is_dir():
        raise ConfigError(f"{checkpoint_dir} is not a ds_distill checkpoint directory (no {TEMPLATE_DIR}/ inside)")
    if tag and tag not in complete_tags(root):
        listed = ", ".join(sorted(complete_tags(root), key=lambda t: int(t.split("_")[-1]))) or "none"
        raise ConfigError(f"--tag {tag}: no complete checkpoint of that name in {checkpoint_dir} (complete: {listed})")
    tag = tag or latest_tag(root)
    if tag is None:
        raise ConfigError(f"no complete checkpoint in {checkpoint_dir}")
    run_dir.check_export_target(target, overwrite, source=root)
    full = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    state = {k[len(STUDENT_PREFIX) :]: v for k, v in full.items() if k.startswith(STUDENT_PREFIX)}
    if (template / PRUNED_FROM).is_dir():  # a HomoDistil run: cut the pruned widths out of the full student
        state = cut_pruned(state, template, extra_state(root, tag))
    save_hf_model(state, template, target, {"checkpoint": str((root / tag).resolve())})
    return target


def cut_pruned(state: dict[str, torch.Tensor], template: Path, masks: dict) -> dict[str, torch.Tensor]:
    """The dense student of the pruned widths, from the full student's state and the pruning masks."""
    from ds_distill.surgery.cut import cut_state
    from ds_distill.surgery.prune import plan_from_masks

    full_config = AutoConfig.from_pretrained(template / PRUNED_FROM)
    return cut_state(state, full_config, AutoConfig.from_pretrained(template), plan_from_masks(full_config, masks))
