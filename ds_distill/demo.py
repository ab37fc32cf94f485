"""`ds-distill demo`: the whole job on an embedded default, with no network and no input files.

    ds-distill demo [--output_dir=runs/demo]

1. writes a deterministic parallel corpus: English into a made-up verb-final language with its own
   words, postpositions and noun-adjective order (so translating needs attention, not word lookup);
2. trains a sentencepiece tokenizer on it;
3. trains a small T5 teacher (the ordinary `distill` path with no teacher and a CE loss);
4. cuts a student 3.96x smaller from the teacher's weights (half of its channels, heads and FFN neurons, ranked
   by their activations) and distils it: teacher under ZeRO-3 inference, student under ZeRO-2;
5. distils a randomly initialised student of the same shape the same way, and trains it once more without
   the teacher, for the same steps;
6. prints parameters, validation loss, BLEU and inference tokens/s of all four.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import torch

from ds_distill import dist, models
from ds_distill.config.deepspeed import PROJECT_ROOT
from ds_distill.config.run import FromTeacherConfig, RunConfig, to_dict
from ds_distill.config.typed import from_dict
from ds_distill.data.tokenizers import train_sentencepiece_tokenizer

# -- the corpus ------------------------------------------------------------------------------------------

NOUNS = """dog cat bird horse farmer teacher doctor child river house garden city boat tree friend king queen
    baker sailor village wolf fox bear mouse""".split()
ADJECTIVES = "big small old young red green happy sad brave clever tired hungry".split()
VERBS = "like watch follow help visit call push pull paint clean kick chase".split()
PREPOSITIONS = "in near behind under with".split()


def _pseudo_words(count: int, rng: random.Random) -> list[str]:
    onsets, vowels, codas = "b d f g k l m n p r s t v z".split(), "a e i o u".split(), ["", "n", "r", "l", "k"]
    words: set[str] = set()
    while len(words) < count:
        syllables = 2
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables)))
    return sorted(words)


def _english_verb(verb: str, past: bool) -> str:
    if past:
        return verb + ("d" if verb.endswith("e") else "ed")
    return verb + ("es" if verb.endswith(("ch", "sh", "ss")) else "s")


class ToyLanguage:
    """English -> a verb-final language with postpositions and nouns before adjectives.

    'The big dog chased a cat near the house.' -> 'Dogo bigi la houso la teka cato un vumarir.'
    Nouns and adjectives keep their English stems (with endings), verbs and prepositions are words of
    their own, and the word order changes, so a model must learn a lexicon, inflection and reordering.
    """

    def __init__(self, seed: int = 0):
        rng = random.Random(seed)
        words = _pseudo_words(len(VERBS) + len(PREPOSITIONS), rng)
        rng.shuffle(words)
        self.lexicon = dict(zip(VERBS + PREPOSITIONS, words))

    def noun_phrase(self, rng: random.Random) -> tuple[str, str]:
        noun, plural = rng.choice(NOUNS), rng.random() < 0.3
        adjectives = rng.sample(ADJECTIVES, rng.choice([0, 0, 1, 1, 2]))
        definite = rng.random() < 0.6
        det_en = "the" if definite else ("some" if plural else "a")
        english = " ".join([det_en, *adjectives, noun + ("s" if plural else "")])
        target_noun = noun + ("oek" if plural else "o")
        target = " ".join([target_noun, *[a + "i" for a in reversed(adjectives)], "la" if definite else "un"])
        return english, target

    def sentence(self, rng: random.Random) -> tuple[str, str]:
        subject_en, subject_zz = self.noun_phrase(rng)
        object_en, object_zz = self.noun_phrase(rng)
        verb, past = rng.choice(VERBS), rng.random() < 0.5
        english = [subject_en, _english_verb(verb, past), object_en]
        target = [subject_zz]
        if rng.random() < 0.5:
            preposition = rng.choice(PREPOSITIONS)
            place_en, place_zz = self.noun_phrase(rng)
            english += [preposition, place_en]
            target += [place_zz, self.lexicon[preposition]]
        target += [object_zz, self.lexicon[verb] + ("ir" if past else "ar")]
        return " ".join(english).capitalize() + ".", " ".join(target).capitalize() + "."


def write_corpus(directory: Path, train_size: int, valid_size: int, seed: int = 0) -> dict[str, str]:
    """Writes train/valid JSONL in the hub's WMT layout ({"translation": {"en": ..., "zz": ...}})."""
    language, rng = ToyLanguage(seed), random.Random(seed + 1)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    seen: set[str] = set()
    for split, size in (("train", train_size), ("validation", valid_size)):
        rows = []
        while len(rows) < size:
            english, target = language.sentence(rng)
            if english not in seen:  # keep validation sentences out of training
                seen.add(english)
                rows.append(json.dumps({"translation": {"en": english, "zz": target}}))
        files[split] = str(directory / f"{split}.jsonl")
        Path(files[split]).write_text("\n".join(rows) + "\n")
    return files


# -- models ----------------------------------------------------------------------------------------------

TEACHER_SHAPE = dict(d_model=256, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=64)
# half the teacher's width at its depth: 3.96x smaller (the blocks shrink 4x, embeddings 2x), and a student cut
# from the teacher keeps every block
STUDENT_SHAPE = FromTeacherConfig(encoder_layers=4, decoder_layers=4, d_model=128, d_ff=512, num_heads=2)


def save_initial_models(tokenizer, directory: Path, seed: int) -> tuple[Path, Path]:
    """Random-weight teacher and student directories (the student is the teacher's shape, shrunk)."""
    from transformers import T5Config, T5ForConditionalGeneration

    vocab_size = -(-len(tokenizer) // 64) * 64  # padded past the tokenizer, as T5 checkpoints are
    teacher_config = T5Config(
        vocab_size=vocab_size,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dropout_rate=0.0,  # a few hundred steps on a clean corpus: nothing to regularise
        **TEACHER_SHAPE,
    )
    student_config = models.adapter_for(teacher_config).shrink(teacher_config, STUDENT_SHAPE)
    paths = []
    for name, config in (("teacher_init", teacher_config), ("student_init", student_config)):
        torch.manual_seed(seed)
        path = directory / name
        with models.quiet_saving():
            T5ForConditionalGeneration(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def run_config(
    output_dir: Path,
    files: dict[str, str],
    student: Path | dict,
    teacher: Path | None,
    losses: dict,
    max_steps: int,
    learning_rate: float,
) -> RunConfig:
    """A demo run; `student` is a model directory or a `student.init` section (cut from the teacher)."""
    on_gpu = torch.cuda.is_available()
    teacher_ds = "teacher_zero3_inference.json" if on_gpu else "teacher_zero3_inference_cpu.json"
    return from_dict(
        RunConfig,
        {
            "teacher": {
                "model_name_or_path": str(teacher) if teacher else None,
                "deepspeed_config": str(PROJECT_ROOT / "ds_configs" / teacher_ds),
            },
            "student": {
                **({"init": student} if isinstance(student, dict) else {"model_name_or_path": str(student)}),
                "deepspeed_config": str(PROJECT_ROOT / "ds_configs" / "student_zero2.json"),
            },
            "data": {
                "task": "translation",
                "dataset": "json",
                "data_files": files,
                "source_lang": "en",
                "target_lang": "zz",
                "max_source_length": 64,
                "max_target_length": 64,
            },
            "losses": losses,
            "train": {
                "output_dir": str(output_dir),
                "max_steps": max_steps,
                "per_device_train_batch_size": 32,
                "learning_rate": learning_rate,
                "warmup_steps": max_steps // 20,
                "logging_steps": 50,
                "eval_metric": "bleu",
                "generation_max_length": 48,
                "per_device_eval_batch_size": 100,
                "seed": 0,
            },
        },
    )


@torch.no_grad()
def inference_tokens_per_s(model_dir: Path, files: dict[str, str], tokenizer, batch_size: int = 64) -> float:
    """Teacher-forced forward throughput on the validation set (source + target tokens per second)."""
    from transformers import AutoModelForSeq2SeqLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval().to(device)
    pairs = [json.loads(line)["translation"] for line in open(files["validation"])]
    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        inputs = tokenizer(
            [p["en"] for p in chunk], text_target=[p["zz"] for p in chunk], padding=True, return_tensors="pt"
        )
        batches.append(inputs.to(device))
    model(**batches[0])  # warm-up
    tokens, started = 0, time.perf_counter()
    for inputs in batches:
        model(**inputs)
        tokens += int(inputs["attention_mask"].sum()) + int((inputs["labels"] != tokenizer.pad_token_id).sum())
    return tokens / (time.perf_counter() - started)


def _final_eval(run_dir: Path) -> dict[str, float]:
    evals = [json.loads(line) for line in open(run_dir / "log.jsonl") if "eval/loss" in line]
    return {"loss": evals[-1]["eval/loss"], "bleu": evals[-1]["eval/bleu"]}


DEMO_ENTRIES = (
    "data", "tokenizer", "teacher_init", "student_init", "teacher", "distilled", "distilled_random", "no_teacher",
    "results.md",
)  # fmt: skip


def _prepare_inputs(output_dir: Path) -> tuple[dict[str, str], Path, Path]:
    """Corpus, tokenizer and initial models, written by rank 0 once; an earlier demo's entries are replaced
    (only those: output_dir may hold other things, such as the log a launch script writes)."""
    files = {split: str(output_dir / "data" / f"{split}.jsonl") for split in ("train", "validation")}
    if dist.is_main():
        for entry in DEMO_ENTRIES:
            path = output_dir / entry
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        write_corpus(output_dir / "data", train_size=8000, valid_size=200)
        tokenizer = train_sentencepiece_tokenizer(
            files["train"], ("en", "zz"), output_dir / "tokenizer", vocab_size=256
        )
        save_initial_models(tokenizer, output_dir, seed=0)
    dist.barrier()
    return files, output_dir / "teacher_init", output_dir / "student_init"


def run_demo(output_dir: Path, teacher_steps: int = 300, student_steps: int = 150) -> None:
    from ds_distill.data.tokenizers import load_tokenizer
    from ds_distill.train.loop import train_student

    dist.init()
    started = time.perf_counter()
    files, teacher_init, student_init = _prepare_inputs(output_dir)

    kd = {"ce": {"weight": 1.0}, "kd": {"weight": 1.0, "divergence": "forward_kl"}}
    dist.print_main(f"[1/4] training the teacher for {teacher_steps} steps")
    teacher = train_student(
        run_config(output_dir / "teacher", files, teacher_init, None, {"ce": {"weight": 1.0}}, teacher_steps, 7e-4)
    )
    dist.print_main(
        f"[2/4] cutting a student from the teacher's weights (channels, heads and FFN neurons ranked by their "
        f"activations) and distilling it for {student_steps} steps (teacher ZeRO-3, student ZeRO-2)"
    )
    sliced = {"from_teacher": {**vars(STUDENT_SHAPE), "strategy": "sliced", "width": "importance"}}
    from_teacher = train_student(run_config(output_dir / "distilled", files, sliced, teacher, kd, student_steps, 1e-3))
    dist.print_main(f"[3/4] distilling a randomly initialised student of the same shape for {student_steps} steps")
    from_random = train_student(
        run_config(output_dir / "distilled_random", files, student_init, teacher, kd, student_steps, 1e-3)
    )
    dist.print_main(f"[4/4] training that random student without the teacher for {student_steps} steps")
    alone = train_student(
        run_config(output_dir / "no_teacher", files, student_init, None, {"ce": {"weight": 1.0}}, student_steps, 1e-3)
    )
    if not dist.is_main():
        return
    rows = []
    models_to_show = (
        ("teacher", teacher),
        ("distilled student, from the teacher's weights", from_teacher),
        ("distilled student, random init", from_random),
        ("no-teacher student, random init", alone),
    )
    for name, model_dir in models_to_show:
        hf_config = models.load_config(str(model_dir), "model")
        rows.append(
            (
                name,
                models.count_parameters(hf_config),
                _final_eval(model_dir.parent),
                inference_tokens_per_s(model_dir, files, load_tokenizer(str(output_dir / "tokenizer"))),
            )
        )
    table = ["| model | parameters | validation loss | BLEU | inference tokens/s |", "|---|---:|---:|---:|---:|"]
    for name, params, scores, speed in rows:
        table.append(f"| {name} | {params / 1e6:.2f}M | {scores['loss']:.3f} | {scores['bleu']:.1f} | {speed:,.0f} |")
    summary = "\n".join(table)
    (output_dir / "results.md").write_text(summary + "\n")
    ratio = rows[0][1] / rows[1][1]
    print(
        f"\n{summary}\n\nstudent is {ratio:.1f}x smaller than the teacher; "
        f"demo took {time.perf_counter() - started:.0f} s; exported models and TensorBoard events in {output_dir}"
    )
    share = rows[1][2]["bleu"] / max(rows[0][2]["bleu"], 1e-9)
    print(f"the student cut from the teacher and distilled reaches {share:.0%} of the teacher's BLEU")


# -- the tiny chain of launch_scripts/tiny_cpu.sh ---------------------------------------------------------


def write_tiny_chain(output_dir: Path, teacher_steps: int = 300, student_steps: int = 150) -> Path:
    """Writes output_dir/chain.yaml and returns its path: a three-stage chain on the demo's corpus, the T5
    teacher trained from scratch (stage `teacher`), then `half` (all blocks, half the width) and `quarter` (2+2
    blocks, a quarter of the width), each cut from the stage before by activation and distilled by it. Its
    inputs are written once into output_dir/inputs. Needs no process group: every rank of a launch may call it
    (the first one there writes the inputs, the others wait for them)."""
    import yaml
    from filelock import FileLock

    output_dir = output_dir.absolute()  # chain.yaml lives in output_dir: its paths must not be relative to it
    inputs = output_dir / "inputs"
    files = {split: str(inputs / "data" / f"{split}.jsonl") for split in ("train", "validation")}
    inputs.mkdir(parents=True, exist_ok=True)
    with FileLock(inputs / ".lock"):
        if not (inputs / "teacher_init" / "config.json").is_file():
            write_corpus(inputs / "data", train_size=8000, valid_size=200)
            tokenizer = train_sentencepiece_tokenizer(
                files["train"], ("en", "zz"), inputs / "tokenizer", vocab_size=256
            )
            save_initial_models(tokenizer, inputs, seed=0)
        path = output_dir / "chain.yaml"
        text = yaml.safe_dump(_tiny_chain(output_dir, inputs, files, teacher_steps, student_steps))
        if not path.is_file() or path.read_text() != text:  # a rank past the lock may be reading it
            staging = path.with_name(f"{path.name}.{os.getpid()}")
            staging.write_text(text)
            os.replace(staging, path)
    return path


def _tiny_chain(output_dir: Path, inputs: Path, files: dict, teacher_steps: int, student_steps: int) -> dict:
    ce = {"ce": {"weight": 1.0}}
    defaults = to_dict(run_config(output_dir / "unused", files, inputs / "teacher_init", None, ce, student_steps, 1e-3))
    del defaults["train"]["output_dir"]
    defaults["teacher"]["model_name_or_path"] = None
    defaults["student"] = {"deepspeed_config": defaults["student"]["deepspeed_config"]}
    kd = {"kd": {"weight": 1.0, "divergence": "forward_kl"}}

    def cut(layers: int, d_model: int) -> dict:
        dims = {"encoder_layers": layers, "decoder_layers": layers, "d_model": d_model, "d_ff": 4 * d_model}
        sliced = {**dims, "num_heads": d_model // 64, "strategy": "sliced", "width": "importance"}
        return {"init": {"from_teacher": sliced}}

    teacher_shape = TEACHER_SHAPE["d_model"]
    return {
        "output_dir": str(output_dir),
        "defaults": defaults,
        "stages": [
            {"name": "teacher", "student": {"model_name_or_path": str(inputs / "teacher_init")},
             "train": {"max_steps": teacher_steps, "learning_rate": 7e-4}},
            {"name": "half", "student": cut(4, teacher_shape // 2), "losses": kd},
            {"name": "quarter", "student": cut(2, teacher_shape // 4), "losses": kd},
        ],
    }  # fmt: skip
