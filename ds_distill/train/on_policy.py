"""On-policy KD (GKD, Agarwal et al. 2024): on a share of micro-batches the student's own samples are the targets.

    losses:
      kd: {divergence: jsd, beta: 0.5, on_policy: {fraction: 0.5, temperature: 1.0, max_new_tokens: 64}}

For `fraction` of the micro-batches, drawn from (seed, micro-batch number), so the same on every rank and in a
resumed run, the student samples continuations (at `temperature`) of the batch's sources (encoder-decoder), of
its prompts (decoder-only, data.prompt_field; a conversation before its last assistant turn, data.messages_field)
or of each block's first `prompt_tokens` (decoder-only, packed text); the batch then holds those samples as its
targets, the teacher scores them like any batch, and the KD term (any divergence, at losses.kd.temperature) is
taken on the sampled tokens only. The other micro-batches are teacher-forced on the data as before. CE and every
other term stay means over the step's data tokens; KD becomes a mean over all its tokens, the data's and the
sampled ones ("sampled" in the step's token counts).

The samples are pure ancestral samples of the student at `temperature`: of the model's generation config only
its ids are kept (where a sequence starts and with what language, every id that ends one, what pads), none of
its search settings or logits processors (beams, n-gram blocking, repetition penalties, minimum lengths, forced
tokens: BART-base ships the first three, Qwen2.5-Instruct a repetition penalty), which would make the samples
another policy's.
Evaluation and the export keep that config as it is. A sample ends at its first end id, whichever of the
model's it is (Qwen-Instruct ends at `<|im_end|>` or `<|endoftext|>`): nothing after it is a target.

Under ZeRO-3 the student generates with its weights gathered module by module and all ranks in step
(`synced_gpus`), as evaluation does.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import GenerationConfig

from ds_distill import dist, models
from ds_distill.data import IGNORE_INDEX, batches

STREAM = 0x0B  # keeps the draw apart from other streams seeded by train.seed
TERMS = ("kd",)  # the terms an on-policy micro-batch takes


class OnPolicy:
    """Which micro-batches are on-policy, and those batches with the student's samples as their targets."""

    def __init__(self, options, seed: int, adapter: models.ModelAdapter, tokenizer, generation_config, *,
                 synced: bool, prompted: bool):  # fmt: skip
        """`generation_config`: the student's, whose ids the samples keep; `synced`: generate with the ranks in
        step (ZeRO-3); `prompted`: decoder-only examples have prompts."""
        self.options, self.seed, self.adapter, self.tokenizer = options, seed, adapter, tokenizer
        self.synced, self.prompted = synced, prompted
        self.end_ids = end_ids(tokenizer, generation_config)
        self.sampling = sampling_config(generation_config, options, tokenizer, self.end_ids)

    def prompt_length(self, batch: dict[str, torch.Tensor]) -> int:
        return min(self.options.prompt_tokens, batch["input_ids"].shape[1] - 1)

    def chooses(self, micro_batch: int) -> bool:
        """Whether micro-batch number `micro_batch` of the run is on-policy (no draw at fraction 0)."""
        if self.options.fraction <= 0:
            return False
        return np.random.default_rng([self.seed, STREAM, micro_batch]).random() < self.options.fraction

    @torch.no_grad()
    def sampled(self, student, batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        """`batch` (on the host) with the student's samples as its targets, on the host."""
        training = student.training
        student.eval()  # no dropout while sampling: the samples are the policy's own
        prompt_rows = batches.prompts(batch) if self.adapter.kind != "seq2seq" and self.prompted else None
        if self.adapter.kind == "seq2seq":
            sources = {key: batch[key] for key in ("input_ids", "attention_mask")}
        elif prompt_rows is not None:  # prompts of their own lengths, left-padded to end together
            sources = batches.left_padded(prompt_rows, self.tokenizer.pad_token_id)
        else:  # packed blocks: no padding, so every prompt has the same length
            ids = batch["input_ids"][:, : self.prompt_length(batch)]
            sources = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        # the model's own config stands aside: `generate` fills what a passed config leaves unset from it
        own, student.generation_config = student.generation_config, self.sampling
        try:
            sources = {key: value.to(device) for key, value in sources.items()}
            outputs = student.generate(**sources, synced_gpus=self.synced).cpu()
        finally:
            student.generation_config = own
            student.train(training)
        return self._as_targets(batch, outputs, prompt_rows)

    def _as_targets(self, batch: dict[str, torch.Tensor], outputs: torch.Tensor, prompt_rows=None):
        """The batch with `outputs` (generate's sequences) as its labels: every sampled token up to and with the
        first end id; what generate padded after it does not count. `prompt_rows`: the prompts of a prompted
        decoder-only batch, which `outputs` continue after their left padding."""
        if self.adapter.kind == "seq2seq":
            sampled = outputs[:, 1:]  # after the decoder's start token
            labels = _until_end(sampled, self.end_ids)
            return {
                "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"],
                "labels": labels,
                "decoder_input_ids": outputs[:, :-1],  # what the student read while sampling
            }
        if prompt_rows is not None:
            return self._prompted_targets(outputs, prompt_rows)
        prompt = self.prompt_length(batch)
        labels = torch.full_like(outputs, IGNORE_INDEX)
        labels[:, prompt:] = _until_end(outputs[:, prompt:], self.end_ids)
        attention_mask = torch.ones_like(outputs)
        attention_mask[:, prompt:] = labels[:, prompt:] != IGNORE_INDEX
        return {"input_ids": outputs, "attention_mask": attention_mask, "labels": labels}

    def _prompted_targets(self, outputs: torch.Tensor, prompt_rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Each row as prompt + its sampled tokens up to and with the first end id, right-padded as training
        batches are."""
        start = max(len(prompt) for prompt in prompt_rows)  # where the left-padded prompts end
        sampled = _until_end(outputs[:, start:], self.end_ids)
        rows = [
            (prompt, [token for token in row if token != IGNORE_INDEX])
            for prompt, row in zip(prompt_rows, sampled.tolist())
        ]
        longest = max(len(prompt) + len(new) for prompt, new in rows)
        out = {
            "input_ids": torch.full((len(rows), longest), self.tokenizer.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), longest), dtype=torch.long),
            "labels": torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long),
        }
        for index, (prompt, new) in enumerate(rows):
            length = len(prompt) + len(new)
            out["input_ids"][index, :length] = torch.tensor(prompt + new, dtype=torch.long)
            out["attention_mask"][index, :length] = 1
            out["labels"][index, len(prompt) : length] = torch.tensor(new, dtype=torch.long)
        return out


def end_ids(tokenizer, generation_config) -> list[int]:
    """Every id that ends a sample: the tokenizer's end-of-sequence token and the generation config's (one id
    or a list), at any of which `generate` stops a row."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({*ids, tokenizer.eos_token_id} - {None})


def sampling_config(model_config, options, tokenizer, end: list[int]) -> GenerationConfig:
    """Ancestral sampling at `options.temperature` from the student's distribution over the tokenizer's
    vocabulary, ending at any of `end`: of `model_config` (the student's generation config) only the ids where
    a sequence starts (mBART's forced first token, the target language, which every target of the data starts
    with too), and the ids it suppresses past the tokenizer (rows of a padded embedding, which the KD term never
    compares: `export.generation_config`)."""
    padded = [i for i in model_config.suppress_tokens or [] if i >= len(tokenizer)]
    return GenerationConfig(
        do_sample=True, num_beams=1, temperature=options.temperature, top_k=0, top_p=1.0,
        max_new_tokens=options.max_new_tokens, eos_token_id=end or None, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=model_config.bos_token_id, decoder_start_token_id=model_config.decoder_start_token_id,
        forced_bos_token_id=model_config.forced_bos_token_id, suppress_tokens=padded or None,
    )  # fmt: skip


def _until_end(tokens: torch.Tensor, end: list[int]) -> torch.Tensor:
    """`tokens` with everything after each row's first id of `end` set to IGNORE_INDEX."""
    if not end:
        return tokens.clone()
    is_end = torch.isin(tokens, torch.tensor(end)).int()
    ended = is_end.cumsum(1) - is_end > 0
    return tokens.masked_fill(ended, IGNORE_INDEX)


def synced_generation(student_ds: dict) -> bool:
    from ds_distill.config import deepspeed as ds_config

    return ds_config.zero_stage(student_ds) == 3 and dist.world_size() > 1
