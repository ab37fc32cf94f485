"""Per-step cost of ds_distill's training loop against a minimal hand-written two-engine loop (CPU).

    python bench/step_overhead.py [--rounds=6] [--steps_per_round=20]

What a new user would try: a random T5 teacher (4+4 blocks, d_model 128) with a 2000-piece sentencepiece
vocabulary trained on the shared WMT sample, under teacher_zero3_inference_cpu.json; a 2+2-block d_model-64
student under student_zero2.json; micro-batch 4 of EN-DE pairs at up to 48 + 48 tokens; CE + forward KL at
T = 2; one process. The hand-written loop builds the same two engines from the same DeepSpeed files and batches,
and computes the loss inline. Rounds alternate between the two, so drift of the machine hits both alike; the
ratio is toolkit time / hand time.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import fire
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_distill import dist  # noqa: E402
from ds_distill.config.run import RunConfig  # noqa: E402
from ds_distill.config.typed import from_dict  # noqa: E402
from tests import tiny_models  # noqa: E402

BATCH = 4


def build_teacher(
    directory: Path, tokenizer, d_model: int = 128, d_ff: int = 256, num_heads: int = 4, layers: int = 4
) -> Path:
    """A random Flan-T5-style teacher (gated GELU, separate head) saved with the tokenizer in directory/teacher."""
    from transformers import T5Config

    from ds_distill.models import adapter_for

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=tiny_models.padded_vocab(tokenizer), d_model=d_model, d_ff=d_ff, d_kv=d_model // num_heads,
        num_heads=num_heads, num_layers=layers, num_decoder_layers=layers, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = adapter_for(config).from_config(config)
    model.save_pretrained(directory / "teacher")
    tokenizer.save_pretrained(directory / "teacher")
    return directory / "teacher"


def run_config(teacher: Path, output_dir: Path) -> RunConfig:
    return from_dict(
        RunConfig,
        {
            "teacher": {
                "model_name_or_path": str(teacher),
                "deepspeed_config": "ds_configs/teacher_zero3_inference_cpu.json",
            },
            "student": {
                "init": {"from_teacher": {"encoder_layers": 2, "decoder_layers": 2, "d_model": 64}},
                "deepspeed_config": "ds_configs/student_zero2.json",
            },
            "data": {
                "task": "translation",
                "dataset": "json",
                "source_lang": "en",
                "target_lang": "de",
                "data_files": {"train": str(tiny_models.SHARED_DATA / "train.jsonl")},
                "validation_split": None,
                "max_source_length": 48,
                "max_target_length": 48,
            },
            "losses": {"ce": {"weight": 1.0}, "kd": {"weight": 1.0, "temperature": 2.0}},
            "train": {
                "output_dir": str(output_dir),
                "max_steps": 100000,
                "per_device_train_batch_size": BATCH,
                "logging_steps": 10,
                "learning_rate": 1e-3,
                "seed": 0,
                "group_by_length": False,  # the hand-written loop's shuffled batches: same padding on both sides
            },
        },
    )


class HandLoop:
    """What one would write by hand: two engines, a DataLoader, the loss inline."""

    def __init__(self, prepared):
        import deepspeed
        from transformers import AutoModelForSeq2SeqLM

        from ds_distill.data.batches import make_collator
        from ds_distill.models import adapter_for

        run = prepared.run
        teacher = AutoModelForSeq2SeqLM.from_pretrained(run.teacher.model_name_or_path).eval().requires_grad_(False)
        self.teacher, *_ = deepspeed.initialize(model=teacher, config=prepared.teacher_ds)
        torch.manual_seed(0)
        student = adapter_for(prepared.student_config).from_config(prepared.student_config)
        self.student, *_ = deepspeed.initialize(
            model=student, model_parameters=student.parameters(), config=prepared.student_ds
        )
        collate = make_collator(run.data, prepared.tokenizer, student)
        self.loader = torch.utils.data.DataLoader(
            prepared.datasets["train"], batch_size=BATCH, shuffle=True, drop_last=True, collate_fn=collate
        )
        self.batches = iter(self.loader)

    def steps(self, count: int) -> None:
        for _ in range(count):
            try:
                batch = next(self.batches)
            except StopIteration:
                self.batches = iter(self.loader)
                batch = next(self.batches)
            labels = batch.pop("labels")
            with torch.no_grad():
                teacher_logits = self.teacher(**batch).logits
            logits = self.student(**batch).logits.float()
            mask = labels != -100
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            vocab = min(logits.shape[-1], teacher_logits.shape[-1])
            log_s = F.log_softmax(logits[..., :vocab] / 2.0, -1)
            log_t = F.log_softmax(teacher_logits[..., :vocab].float() / 2.0, -1)
            kl = ((log_t.exp() * (log_t - log_s)).sum(-1) * mask).sum() / mask.sum() * 4.0
            self.student.backward(ce + kl)
            self.student.step()


def main(rounds: int = 6, steps_per_round: int = 20) -> None:
    from ds_distill.train.loop import Trainer
    from ds_distill.train.prepare import prepare

    dist.init()
    work = Path(tempfile.mkdtemp(prefix="step_overhead_"))
    tokenizer = tiny_models.train_tokenizer(work / "tokenizer", vocab_size=2000)
    teacher = build_teacher(work, tokenizer)
    prepared = prepare(run_config(teacher, work / "run"))
    toolkit, hand = Trainer(prepared), HandLoop(prepared)
    toolkit.begin()
    toolkit.train_steps(until=steps_per_round)  # warm-up, untimed
    hand.steps(steps_per_round)
    toolkit_seconds = hand_seconds = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        toolkit.train_steps(until=toolkit.students[0].step + steps_per_round)
        toolkit_seconds += time.perf_counter() - started
        started = time.perf_counter()
        hand.steps(steps_per_round)
        hand_seconds += time.perf_counter() - started
    steps = rounds * steps_per_round
    print(
        f"toolkit {1000 * toolkit_seconds / steps:.1f} ms/step, hand-written {1000 * hand_seconds / steps:.1f} "
        f"ms/step over {steps} steps each: ratio {toolkit_seconds / hand_seconds:.3f}"
    )


if __name__ == "__main__":
    fire.Fire(main)
