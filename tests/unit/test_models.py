"""Model adapters: shrinking configs per family, head classes, parameter counts on the meta device."""

import pytest
import transformers
from transformers import AutoConfig

from ds_distill import models
from ds_distill.config.run import FromTeacherConfig
from ds_distill.errors import ConfigError


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


@pytest.mark.parametrize("family", ["t5", "gpt2", "llama"])
def test_fused_kernels_compute_what_the_eager_modules_compute(tiny, family):
    import copy

    import torch

    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, vocab_size=200
        )
    else:
        config = AutoConfig.from_pretrained(tiny[family])
    torch.manual_seed(0)
    # in float64, so that float32 rounding through the blocks (1.1e-5 in a T5 logit on some CPUs) does not decide;
    # T5's eager norm still takes its statistics in float32 (3e-6 apart here)
    fused = models.adapter_for(config).from_config(config).eval().double()
    eager = copy.deepcopy(fused)
    swapped = [m for m in eager.modules() if m.__dict__.pop("forward", None) is not None]  # back to the class's own
    assert swapped, "nothing of this family was swapped"
    inputs = {"input_ids": torch.randint(3, 200, (2, 7))}
    if family == "t5":
        inputs["decoder_input_ids"] = inputs["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(fused(**inputs).logits, eager(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_each_fused_module_equals_its_eager_forward_over_a_wide_range():
    import torch
    from transformers.activations import NewGELUActivation
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from ds_distill.models.fused import use_fused_kernels

    torch.manual_seed(0)
    inputs = torch.linspace(-8, 8, 4096).reshape(2, 32, 64) * torch.rand(2, 32, 1) * 3
    for module in (NewGELUActivation(), T5LayerNorm(64, eps=1e-3), LlamaRMSNorm(64, eps=1e-3)):
        if hasattr(module, "weight"):
            module.weight.data = torch.randn(64)
        expected = module(inputs)
        assert use_fused_kernels(module) == 1
        torch.testing.assert_close(module(inputs), expected, rtol=1e-6, atol=1e-6)


def test_a_v1_1_style_t5_saved_with_a_tied_head_loads_as_transformers_loads_it(tmp_path):
    """transformers 5 ties the head of T5Config(tie_word_embeddings=False) and stores only `shared.weight`;
    loading it with a separate head would start that head random."""
    import torch

    config = transformers.T5Config(
        vocab_size=96, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    assert "lm_head.weight" not in models.checkpoint_keys(str(tmp_path / "t5"))
    ours = models.adapter_for(config).from_pretrained(str(tmp_path / "t5")).eval()
    reference = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "t5").eval()
    ids = torch.randint(2, 96, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids, decoder_input_ids=ids).logits, reference(input_ids=ids, decoder_input_ids=ids).logits
        )


def test_a_checkpoint_that_lacks_a_tensor_is_refused_by_name(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from ds_distill.errors import ConfigError

    broken = tmp_path / "broken"
    transformers.AutoModelForCausalLM.from_pretrained(tiny["gpt2"]).save_pretrained(broken)
    weights = load_file(broken / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    weights["transformer.h.1.mlp.extra.weight"] = weights["transformer.h.0.mlp.c_fc.bias"].clone()
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    config = AutoConfig.from_pretrained(broken)
    message = (
        r"missing \(would start random\): transformer.h.1.mlp.c_fc.weight; not in the model: transformer.h.1.mlp.extra"
    )
    with pytest.raises(ConfigError, match=message):
        models.adapter_for(config).from_pretrained(str(broken), "teacher")
