"""Model adapters: shrinking configs per family, head classes, parameter counts on the meta device."""

import pytest
import transformers
from transformers import AutoConfig

from ds_distill import models
from ds_distill.config import ConfigError, FromTeacherConfig


@pytest.mark.parametrize(
    "name, dims, expected",
    [
        (
            "t5",
            FromTeacherConfig(encoder_layers=1, decoder_layers=1, d_model=32, d_ff=64, num_heads=2),
            {"num_layers": 1, "num_decoder_layers": 1, "d_model": 32, "d_ff": 64, "num_heads": 2},
        ),
        (
            "gpt2",
            FromTeacherConfig(decoder_layers=1, d_model=32, num_heads=2),
            {"n_layer": 1, "n_embd": 32, "n_head": 2},
        ),
        (
            "bert",
            FromTeacherConfig(encoder_layers=1, d_model=32, d_ff=64, num_heads=2),
            {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2},
        ),
    ],
)
def test_shrink_sets_each_family_fields_and_keeps_the_rest(tiny, name, dims, expected):
    teacher = AutoConfig.from_pretrained(tiny[name])
    student = models.adapter_for(teacher).shrink(teacher, dims)
    assert {k: getattr(student, k) for k in expected} == expected
    assert student.vocab_size == teacher.vocab_size
    assert models.count_parameters(student) < models.count_parameters(teacher)


def test_llama_keeps_its_grouping_of_key_value_heads():
    teacher = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=2,
        vocab_size=100,
    )
    student = models.adapter_for(teacher).shrink(teacher, FromTeacherConfig(d_model=32, num_heads=4))
    assert (student.num_attention_heads, student.num_key_value_heads, student.head_dim) == (4, 1, 8)


def test_dimension_a_family_lacks_is_refused(tiny):
    teacher = AutoConfig.from_pretrained(tiny["gpt2"])
    with pytest.raises(ConfigError, match="from_teacher.encoder_layers does not apply to gpt2 .*use decoder_layers"):
        models.adapter_for(teacher).shrink(teacher, FromTeacherConfig(encoder_layers=1))


def test_indivisible_heads_are_refused(tiny):
    teacher = AutoConfig.from_pretrained(tiny["bert"])
    with pytest.raises(ConfigError, match="d_model 30 is not divisible by num_heads 4"):
        models.adapter_for(teacher).shrink(teacher, FromTeacherConfig(d_model=30))


def test_head_classes_follow_the_checkpoint(tiny):
    for name, head in (
        ("t5", "T5ForConditionalGeneration"),  # with a separate LM head, as Flan-T5
        ("gpt2", "AutoModelForCausalLM"),
        ("bert", "AutoModelForMaskedLM"),
        ("bert_bare", "AutoModel"),
    ):
        config = AutoConfig.from_pretrained(tiny[name])
        assert models.adapter_for(config).model_class(config).__name__ == head


def test_built_t5_students_keep_a_separate_lm_head(tiny):
    config = AutoConfig.from_pretrained(tiny["t5"])
    model = models.adapter_for(config).from_config(config)
    assert model.lm_head.weight is not model.shared.weight


def test_missing_model_path_is_named():
    with pytest.raises(ConfigError, match="teacher.model_name_or_path '/no/such/model' is neither a local model"):
        models.load_config("/no/such/model", "teacher")


def test_unsupported_family_is_named():
    with pytest.raises(ConfigError, match="model_type 'vit' has no adapter yet"):
        models.adapter_for(transformers.ViTConfig())
