"""The LM head folded into the logit terms: the same losses and gradients as from whole logits, in every family."""

from __future__ import annotations

import pytest
import torch

from ds_distill.objectives import logits as logit_losses
from ds_distill.objectives.features import aligned_labels, forward_features, model_inputs
from ds_distill.objectives.layerwise import ModelPair
from ds_distill.objectives.registry import build_losses
from ds_distill.planner.trace import LiveTensorBytes
from ds_distill.train.student import DistillationModule
from tests.unit.test_capture import FAMILIES, TARGET, VOCAB, tiny_batch, tiny_model


def family_batch(module: DistillationModule) -> dict[str, torch.Tensor]:
    kind = module.adapter.kind
    batch = tiny_batch(kind)
    generator = torch.Generator().manual_seed(2)
    if kind == "seq2seq":
        labels = torch.randint(2, VOCAB, (batch["input_ids"].shape[0], TARGET), generator=generator)
        labels[1, -2:] = -100
    else:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        if kind == "encoder":
            labels[:, ::2] = -100  # masked LM: some positions only
    return {**batch, "labels": labels}


def student_module(family: str) -> DistillationModule:
    """A tiny student with CE + KD; `t5_untied`: a T5 v1.1-style separate head (Flan-T5's)."""
    model = (tiny_model_untied_t5() if family == "t5_untied" else tiny_model(family)).train()
    with torch.no_grad():  # biases around the head that are zero at initialisation
        if family == "bart":
            model.final_logits_bias.normal_()
        if family == "bert":
            model.get_output_embeddings().bias.normal_()
    pair = ModelPair(model.config, model.config)
    losses, weights = build_losses({"ce": {}, "kd": {"temperature": 2.0, "weight": 0.5}}, model_pair=pair)
    return DistillationModule(model, losses, weights)


def tiny_model_untied_t5() -> torch.nn.Module:
    import transformers

    from ds_distill import models

    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, dropout_rate=0.0, tie_word_embeddings=False,
    )  # fmt: skip
    config.scale_decoder_outputs = False
    torch.manual_seed(0)
    return models.adapter_for(config).from_config(config)


def losses_and_gradients(module: DistillationModule, fold: bool):
    batch = family_batch(module)
    generator = torch.Generator().manual_seed(3)
    labels = aligned_labels(module.adapter, batch["labels"])
    teacher = {"logits": torch.randn(*labels.shape, VOCAB + 4, generator=generator)}
    head = module.head
    if not fold:
        module.__dict__["head"] = None
    try:
        module.zero_grad()
        total, terms = module(batch, teacher)
        total.backward()
    finally:
        module.__dict__["head"] = head
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return total.detach(), terms, grads


@pytest.mark.parametrize("family", FAMILIES + ("t5_untied",))
def test_folded_head_gives_the_losses_and_gradients_of_whole_logits(monkeypatch, family):
    """CE + KD at 3 rows per chunk: every term and every parameter's gradient (the head's, a tied embedding's,
    BERT's decoder bias) equal those computed from the model's own logits (rel 1e-5, float32)."""
    monkeypatch.setattr(logit_losses, "CHUNK_ELEMENTS", 3 * VOCAB)
    module = student_module(family)
    assert module.head is not None
    if family == "t5_untied":
        assert module.head.weight is not module.student.shared.weight
    total, terms, grads = losses_and_gradients(module, fold=True)
    expected_total, expected_terms, expected_grads = losses_and_gradients(module, fold=False)
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-5)
    for name in expected_terms:
        assert terms[name].item() == pytest.approx(expected_terms[name].item(), rel=1e-5), name
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(
            grads[name], grad, rtol=1e-5, atol=max(1e-5 * grad.abs().max().item(), 1e-7), msg=name
        )


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_a_folded_forward_names_the_heads_input_and_no_logits(family):
    """With the head folded the features carry `head_input` (the head's input, [batch, rows, d_model], aligned
    as the logits would be) and no `logits`; without it, `logits` over the vocabulary and no `head_input`."""
    module = student_module(family)
    batch = family_batch(module)
    with torch.no_grad():
        folded = forward_features(module.student, module.adapter, batch, head=module.head)
        whole = forward_features(module.student, module.adapter, batch)
    assert "logits" not in folded and folded["head"] is module.head
    assert folded["head_input"].shape == (*whole["logits"].shape[:-1], module.student.config.d_model if family ==
                                          "t5" else module.student.config.hidden_size)  # fmt: skip
    assert "head_input" not in whole and whole["logits"].shape[-1] >= VOCAB
    torch.testing.assert_close(module.head(folded["head_input"]), whole["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["bart", "llama"])
def test_outside_the_training_forward_the_head_computes_the_logits(family):
    """Evaluation and generation call the student itself: after a folded training step its logits are those it
    gave before, over the vocabulary, BART's logits bias included."""
    module = student_module(family)
    batch = family_batch(module)
    with torch.no_grad():
        before = module.student(**model_inputs(batch)).logits
        labels = aligned_labels(module.adapter, batch["labels"])
        module(batch, {"logits": torch.zeros(*labels.shape, VOCAB)})
        after = module.student(**model_inputs(batch)).logits
    assert after.shape[-1] == VOCAB
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_folded_terms_never_hold_the_whole_logits():
    """A llama student with a 4096-word vocabulary, 4 x 256 positions: the training step's forward and backward
    hold a fraction of the micro-batch's float32 logits; unfolded they hold them more than once."""
    import transformers

    from ds_distill import models

    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = models.adapter_for(config).from_config(config).train()
    losses, weights = build_losses({"ce": {}, "kd": {}}, model_pair=ModelPair(config, config))
    module = DistillationModule(model, losses, weights)
    ids = torch.randint(0, 4096, (4, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    teacher = {"logits": torch.randn(4, 255, 4096)}
    logits_bytes = teacher["logits"].numel() * 4

    def peak(fold: bool) -> int:
        head = module.head
        module.__dict__["head"] = head if fold else None
        tracker = LiveTensorBytes()
        tracker.exclude([*module.parameters(), *batch.values(), teacher["logits"]])
        with logit_losses.chunk_elements(2**14), tracker:
            total, _ = module(batch, teacher)
            total.backward()
        module.__dict__["head"] = head
        module.zero_grad(set_to_none=True)
        return tracker.peak

    folded, whole = peak(True), peak(False)
    assert folded < 0.3 * logits_bytes < logits_bytes < whole, (folded / logits_bytes, whole / logits_bytes)
