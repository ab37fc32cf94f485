"""Feature capture per architecture family: the right modules, the right shapes, the same values as Hugging Face."""

from __future__ import annotations

import pytest
import torch
import transformers

from ds_distill import models
from ds_distill.objectives.capture import FeatureCapture, feature_key
from ds_distill.objectives.features import model_inputs

VOCAB, BATCH, SOURCE, TARGET = 96, 2, 7, 5


def tiny_model(family: str) -> torch.nn.Module:
    """Two blocks per stack, d_model 32, 4 heads, d_ff 48, eager attention so Hugging Face returns probabilities."""
    configs = {
        "t5": transformers.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", decoder_start_token_id=0, dropout_rate=0.0,
        ),
        "bart": transformers.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32,
            dropout=0.0, attention_dropout=0.0,
        ),
        "gpt2": transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=32,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        ),
        "llama": transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=32,
        ),
        "bert": transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ),
    }  # fmt: skip
    config = configs[family]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return models.adapter_for(config).from_config(config).eval()


def tiny_batch(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(2, VOCAB, (BATCH, SOURCE), generator=generator),
        "attention_mask": torch.ones(BATCH, SOURCE, dtype=torch.long),
    }
    batch["attention_mask"][1, -2:] = 0  # one padded row
    if kind == "seq2seq":
        batch["decoder_input_ids"] = torch.randint(2, VOCAB, (BATCH, TARGET), generator=generator)
    return batch


FAMILIES = ("t5", "bart", "gpt2", "llama", "bert")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_is_captured_with_its_shape(family):
    model = tiny_model(family)
    adapter = models.adapter_for(model.config)
    keys = {
        feature_key(stack, 1, site) for stack, layout in adapter.layout.items() for site in ("hidden", *layout.sites)
    } | {feature_key(stack, 0, "hidden") for stack in adapter.layout}
    capture = FeatureCapture(model, adapter, keys)
    assert len(capture.handles) == len(keys)  # one hook per requested feature, none elsewhere
    batch = tiny_batch(adapter.kind)
    with capture.recording():
        model(**batch)
    features = capture.pop()
    assert set(features) == keys
    for stack in adapter.layout:
        length = TARGET if (adapter.kind == "seq2seq" and stack == "decoder") else SOURCE
        for site in ("hidden", "attention_output", "ffn_output"):
            assert features[f"{stack}.1.{site}"].shape == (BATCH, length, 32), (stack, site)
        assert features[f"{stack}.0.hidden"].shape == (BATCH, length, 32)
        assert features[f"{stack}.1.ffn_intermediate"].shape == (BATCH, length, 48)
        assert features[f"{stack}.1.self_q"].shape == (BATCH, length, 32)
        kv_width = 16 if family == "llama" else 32  # grouped-query attention: 2 key/value heads of 8
        assert features[f"{stack}.1.self_k"].shape == (BATCH, length, kv_width)
        probs = features[f"{stack}.1.attention_probs"]
        assert probs.shape == (BATCH, 4, length, length)
        torch.testing.assert_close(probs.sum(-1), torch.ones(BATCH, 4, length))
    if adapter.kind == "seq2seq":
        assert features["decoder.1.cross_q"].shape == (BATCH, TARGET, 32)
        assert features["decoder.1.cross_k"].shape == (BATCH, SOURCE, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_captures_equal_the_models_own_hidden_states_and_attentions(family):
    model = tiny_model(family)
    adapter = models.adapter_for(model.config)
    stack = "decoder" if adapter.kind == "causal" else "encoder"
    keys = {f"{stack}.0.hidden", f"{stack}.1.hidden", f"{stack}.2.attention_probs"}
    capture = FeatureCapture(model, adapter, keys)
    batch = tiny_batch(adapter.kind)
    with capture.recording():
        output = model(**batch, output_hidden_states=True, output_attentions=True)
    features = capture.pop()
    prefix = "encoder_" if adapter.kind == "seq2seq" else ""
    hidden_states = getattr(output, f"{prefix}hidden_states")
    attentions = getattr(output, f"{prefix}attentions")
    torch.testing.assert_close(features[f"{stack}.0.hidden"], hidden_states[0])
    torch.testing.assert_close(features[f"{stack}.1.hidden"], hidden_states[1])
    torch.testing.assert_close(features[f"{stack}.2.attention_probs"], attentions[1])


def test_nothing_is_stored_outside_recording():
    model = tiny_model("t5")
    capture = FeatureCapture(model, models.adapter_for(model.config), {"encoder.1.hidden"})
    model(**tiny_batch("seq2seq"))
    assert capture.pop() == {}
    capture.remove()
    with capture.recording():
        model(**tiny_batch("seq2seq"))
    assert capture.pop() == {}


def test_layer_zero_has_no_attention():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="layer 0"):
        FeatureCapture(model, models.adapter_for(model.config), {"encoder.0.self_q"})


def test_gradients_through_captures_survive_gradient_checkpointing():
    """Blocks run again during backward under checkpointing; the gradients must not change."""

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model("t5").train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        adapter = models.adapter_for(model.config)
        capture = FeatureCapture(model, adapter, {"encoder.1.self_q", "decoder.2.hidden", "decoder.1.ffn_output"})
        with capture.recording():
            model(**model_inputs(tiny_batch("seq2seq")))
        loss = sum(feature.square().mean() for feature in capture.pop().values())
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_mapped_layers_leave_the_fused_kernel(family):
    """On an SDPA model, capturing block 2's probabilities computes them there only: they equal what eager
    attention gives (padding and causal masks included), every other block stays on SDPA (returns none), and the
    outputs are the eager model's."""
    fused = tiny_model(family)
    fused.set_attn_implementation("sdpa")
    eager = tiny_model(family)
    adapter = models.adapter_for(fused.config)
    keys = {feature_key(stack, 2, "attention_probs") for stack in adapter.layout}
    capture = FeatureCapture(fused, adapter, keys)
    reference = FeatureCapture(eager, adapter, keys)
    returned = {}
    for stack in adapter.layout:
        module, _ = adapter.site(fused, stack, 1, "attention_probs")
        module.register_forward_hook(lambda m, args, output, stack=stack: returned.setdefault(stack, output[-1]))
    batch = tiny_batch(adapter.kind)
    with capture.recording(), torch.no_grad():
        out = fused(**batch)
    with reference.recording(), torch.no_grad():
        expected = eager(**batch)
    features, expected_features = capture.pop(), reference.pop()
    for key in keys:
        torch.testing.assert_close(features[key], expected_features[key], rtol=1e-5, atol=1e-6)
    assert all(weights is None for weights in returned.values()) and set(returned) == set(adapter.layout)
    result = out.logits if hasattr(out, "logits") else out.last_hidden_state
    reference_result = expected.logits if hasattr(expected, "logits") else expected.last_hidden_state
    torch.testing.assert_close(result, reference_result, rtol=1e-5, atol=1e-5)
