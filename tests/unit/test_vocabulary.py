"""A student's own vocabulary: `ds-distill train_tokenizer` learns one of the teacher's kind from the run's text."""

from __future__ import annotations

from transformers import AutoTokenizer

from tests.conftest import run_verb, translation_config, write_yaml


def test_train_tokenizer_learns_a_vocabulary_of_the_teachers_kind_from_the_runs_text(tiny, tmp_path):
    config = write_yaml(tmp_path / "run.yaml", translation_config(tiny, tmp_path / "run"))
    result = run_verb("train_tokenizer", f"--config={config}", "--vocab_size=300", f"--output_dir={tmp_path / 'tok'}")
    assert result.returncode == 0, result.stderr
    teacher, trained = AutoTokenizer.from_pretrained(tiny["t5"]), AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert 250 <= len(trained) <= 300 < len(teacher)
    assert type(trained.backend_tokenizer.model) is type(teacher.backend_tokenizer.model)  # unigram, as the teacher
    assert repr(trained.backend_tokenizer.pre_tokenizer) == repr(teacher.backend_tokenizer.pre_tokenizer)
    assert (trained.pad_token, trained.eos_token, trained.unk_token) == (teacher.pad_token, teacher.eos_token,
                                                                           teacher.unk_token)  # fmt: skip
    text = "Die Kommission hat heute einen Vorschlag angenommen."  # German and English are both learnt
    assert trained.unk_token_id not in trained(text)["input_ids"]
    assert trained.decode(trained(text)["input_ids"], skip_special_tokens=True) == text
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"{tmp_path / 'tok'}: {len(trained)} tokens, ")

    again = run_verb("train_tokenizer", f"--config={config}", f"--output_dir={tmp_path / 'tok'}")
    assert again.returncode == 2 and "holds a tokenizer already; pass --overwrite" in again.stderr


def test_make_student_with_a_tokenizer_starts_each_token_from_the_teachers_pieces(tiny, tmp_path):
    """A byte-level vocabulary given to a student cut from the SentencePiece teacher: each new row (embedding
    and untied head) is the mean of the cut student's rows for the teacher's pieces of the token's text, the
    special tokens take their namesakes' rows and ids, the rest the mean of all rows."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from ds_distill.surgery.vocabulary import teacher_pieces
    from tests import tiny_models

    rows = [json.loads(line)["translation"] for line in open(tiny_models.SHARED_DATA / "train.jsonl")][:2000]
    vocabulary = tiny_models.byte_level_tokenizer([r[lang] for r in rows for lang in ("en", "de")], 400, tmp_path / "v")
    cut = ["make_student", f"--teacher={tiny['t5']}", "--d_model=32", "--num_heads=2", "--d_ff=64"]
    assert run_verb(*cut, f"--output_dir={tmp_path / 'same'}").returncode == 0
    result = run_verb(*cut, f"--output_dir={tmp_path / 'own'}", f"--tokenizer={tmp_path / 'v'}")
    assert result.returncode == 0, result.stderr
    teacher_tokenizer = AutoTokenizer.from_pretrained(tiny["t5"])
    pieces, coverage = teacher_pieces(vocabulary, teacher_tokenizer)
    assert f"400 tokens: {coverage.one} are one teacher piece, {coverage.several} several" in result.stdout
    assert coverage.one > 50 and coverage.several > 10

    same, own = (load_file(tmp_path / name / "model.safetensors") for name in ("same", "own"))
    for key in ("shared.weight", "lm_head.weight"):
        before, after = same[key][: len(teacher_tokenizer)], own[key]
        assert after.shape == (448, 32)  # 400 rows padded to a multiple of 64
        expected = torch.stack([before[ids].mean(0) if ids else before.mean(0) for ids in pieces])
        torch.testing.assert_close(after[:400], expected)
        assert torch.equal(after[vocabulary.eos_token_id], before[teacher_tokenizer.eos_token_id])
    config = AutoConfig.from_pretrained(tmp_path / "own")
    assert (config.vocab_size, config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (
        448, vocabulary.pad_token_id, vocabulary.eos_token_id, vocabulary.pad_token_id)  # fmt: skip
    assert AutoTokenizer.from_pretrained(tmp_path / "own").get_vocab() == vocabulary.get_vocab()


def test_special_ids_follow_their_role_or_text_into_the_new_vocabulary():
    """Llama 3 lists several end ids (EOS, end of turn): each maps to the new vocabulary's token of the same
    role, else of the same text; one the new vocabulary lacks is left out, and an unmatched single id is None."""
    from transformers import LlamaConfig

    from ds_distill.surgery.vocabulary import PAD_TO, vocabulary_config
    from tests import tiny_models

    lines = ["ein kleiner Satz", "a small sentence"] * 20
    teacher, student = tiny_models.byte_level_tokenizer(lines, 300), tiny_models.byte_level_tokenizer(lines, 280)
    teacher.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|eom_id|>"]})
    student.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    eot, eom = teacher.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>"])
    config = LlamaConfig(vocab_size=len(teacher), pad_token_id=teacher.pad_token_id, bos_token_id=eom,
                         eos_token_id=[teacher.eos_token_id, eot, eom])  # fmt: skip
    vocabulary_config(config, teacher, student)
    assert config.vocab_size == -(-len(student) // PAD_TO) * PAD_TO
    assert config.eos_token_id == [student.eos_token_id, student.convert_tokens_to_ids("<|eot_id|>")]
    assert config.pad_token_id == student.pad_token_id and config.bos_token_id is None
