"""Peak memory and time of `ds-distill make_student` on a Flan-T5-XL-shaped teacher (2.85B parameters).

    python bench/make_student_memory.py [--output_dir=runs/bench_make_student] [--size=145m] \
        [--width=first|importance] [--calibration_batches=2]

Writes a random-weight teacher with Flan-T5-XL's config (24+24 blocks, d_model 2048, d_ff 5120, 32 heads,
gated GELU; a small sentencepiece tokenizer beside it) to disk in bfloat16, sharded safetensors as the hub ships it, one tensor at a time (so writing it
needs no whole copy in memory either), then runs `ds-distill make_student` in a fresh process on it for a
recipe's student and reads the child's peak resident memory
(ru_maxrss; and, sampled, how much of it is the process's own rather than pages of the memory-mapped teacher
files) and wall time. For scale: the teacher's weights alone are 5.7 GB in bfloat16, 11.4 GB in float32.
--width=first reads no activations; --width=importance loads the teacher once in float32 and ranks on
calibration batches (8 sentences each, a seeded sample of the shared WMT sample, 64 + 64 tokens).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_distill import models  # noqa: E402
from ds_distill.config.deepspeed import PROJECT_ROOT  # noqa: E402
from ds_distill.data.tokenizers import train_sentencepiece_tokenizer  # noqa: E402
from tests.tiny_models import SHARED_DATA  # noqa: E402

FLAN_T5_XL = dict(
    vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)  # fmt: skip
STUDENTS = {  # the recipes' students (ds_distill/recipes/flan_t5_3b_*.yaml)
    "145m": dict(encoder_layers=12, decoder_layers=12, d_model=512, d_ff=2048, num_heads=8),
    "780m": dict(encoder_layers=24, decoder_layers=24, d_model=1024, d_ff=2816, num_heads=16),
}
SHARD_BYTES = 2 * 1024**3


def write_teacher(directory: Path) -> float:
    """A random bf16 Flan-T5-XL-shaped checkpoint, tensor by tensor; returns its size in GB."""
    from transformers import T5Config

    config = T5Config(**FLAN_T5_XL)
    with torch.device("meta"):
        shapes = {
            name: tensor.shape for name, tensor in models.adapter_for(config).from_config(config).state_dict().items()
        }
    shapes = {
        name: shape for name, shape in shapes.items() if not name.endswith("embed_tokens.weight")
    }  # tied to shared
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    train_sentencepiece_tokenizer(SHARED_DATA / "train.jsonl", ("en", "de"), directory, vocab_size=4000)
    generator = torch.Generator().manual_seed(0)
    shard, shard_bytes, weight_map, total = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = tensor
        shard_bytes += tensor.numel() * 2
        total += tensor.numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total / 1e9


def watch_memory(pid: int) -> dict[str, float]:
    """Peak anonymous and file-backed resident memory (GB) of a running process, sampled every 20 ms."""
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    while True:
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except FileNotFoundError:
            return peaks
        for line in status:
            key, _, value = line.partition(":")
            if key in peaks:
                peaks[key] = max(peaks[key], int(value.split()[0]) / 1024**2)
        if "State:\tZ" in "\n".join(status):  # exited, not yet reaped
            return peaks
        time.sleep(0.02)


def calibration_data(path: Path) -> Path:
    """A YAML with only the data section make_student --data reads: the shared WMT sample as translation."""
    import yaml

    data = {
        "task": "translation", "dataset": "json", "source_lang": "en", "target_lang": "de",
        "data_files": {"train": str(SHARED_DATA / "train.jsonl")}, "validation_split": None,
        "prefix": "translate English to German: ", "max_source_length": 64, "max_target_length": 64,
    }  # fmt: skip
    path.write_text(yaml.safe_dump({"data": data, "train": {"per_device_train_batch_size": 8}}))
    return path


def main(
    output_dir: str = "runs/bench_make_student", size: str = "145m", width: str = "first", calibration_batches: int = 2
) -> None:
    out = Path(output_dir)
    teacher = out / "flan_t5_xl_shaped"
    if not (teacher / "model.safetensors.index.json").is_file():
        started = time.perf_counter()
        gigabytes = write_teacher(teacher)
        print(f"wrote a {gigabytes:.2f} GB bf16 teacher in {time.perf_counter() - started:.0f} s", flush=True)
    dims = [f"--{key}={value}" for key, value in STUDENTS[size].items()] + [f"--width={width}"]
    if width == "importance":
        dims += [f"--data={calibration_data(out / 'calibration.yaml')}", f"--calibration_batches={calibration_batches}"]
    command = [sys.executable, "-m", "ds_distill", "make_student", f"--teacher={teacher}",
               f"--output_dir={out / f'student_{size}'}", "--overwrite", *dims]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = watch_memory(child.pid)
    stdout, stderr = child.communicate()
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(stderr[-3000:])
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    teacher_gb = sum(f.stat().st_size for f in teacher.glob("*.safetensors")) / 1e9
    student_gb = sum(f.stat().st_size for f in (out / f"student_{size}").glob("*.safetensors")) / 1e9
    print(stdout[-2000:])
    print(
        f"make_student {size} --width={width}: {seconds:.1f} s, peak resident memory {peak_gb:.2f} GB (ru_maxrss), of which at "
        f"most {peaks['RssAnon']:.2f} GB the process's own and {peaks['RssFile']:.2f} GB pages of the mapped "
        f"teacher files (page cache, reclaimable); teacher on disk {teacher_gb:.2f} GB (bf16), student written "
        f"{student_gb:.2f} GB"
    )


if __name__ == "__main__":
    fire.Fire(main)
