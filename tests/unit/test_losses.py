"""Logit losses against their reference formulas, masks and vocabulary padding."""

import math

import pytest
import torch
import torch.nn.functional as F

from ds_distill.errors import ConfigError
from ds_distill.objectives.layerwise import ModelPair
from ds_distill.objectives.registry import build_losses
from tests.unit.test_layer_losses import STUDENT, TEACHER

TEACHER_PRESENT = ModelPair(STUDENT, TEACHER)

torch.manual_seed(0)
BATCH, SEQ, VOCAB = 2, 5, 7


def features(logits, labels):
    return {"logits": logits, "labels": labels}


@pytest.fixture
def pair():
    student = torch.randn(BATCH, SEQ, VOCAB, dtype=torch.float64)
    teacher = torch.randn(BATCH, SEQ, VOCAB, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels[1, 3:] = -100  # padding
    return student, teacher, labels


def kd(**options):
    losses, _ = build_losses({"kd": options}, model_pair=TEACHER_PRESENT)
    return losses["kd"]


def reference(name, p, q, beta=0.5, alpha=0.1):
    """Divergence between teacher distribution p and student q, one position, written out term by term."""

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_kl":
        return kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q)])
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    raise AssertionError(name)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_matches_reference_formula(pair, divergence, temperature):
    student, teacher, labels = pair
    loss = kd(divergence=divergence, temperature=temperature)(features(student, labels), features(teacher, labels))
    expected, count = 0.0, 0
    for b in range(BATCH):
        for t in range(SEQ):
            if labels[b, t] == -100:
                continue
            p = F.softmax(teacher[b, t] / temperature, -1).tolist()
            q = F.softmax(student[b, t] / temperature, -1).tolist()
            expected += reference(divergence, p, q)
            count += 1
    scale = temperature if divergence == "tvd" else temperature**2
    assert loss.item() == pytest.approx(expected / count * scale, rel=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_temperature_scaling_keeps_gradients_the_same_size_as_the_temperature_grows(divergence):
    """T^2 for the KL family, T for TVD: with either, the gradient's size levels off at high temperature."""
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4, 8, 50, dtype=torch.float64, generator=generator)
    teacher = torch.randn(4, 8, 50, dtype=torch.float64, generator=generator)
    labels = torch.zeros(4, 8, dtype=torch.long)
    norms = []
    for temperature in (8.0, 32.0):
        logits = student.clone().requires_grad_(True)
        kd(divergence=divergence, temperature=temperature)(
            features(logits, labels), features(teacher, labels)
        ).backward()
        norms.append(logits.grad.norm().item())
    assert 0.7 < norms[1] / norms[0] < 1.4


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"])
def test_kd_is_zero_for_identical_distributions_and_positive_otherwise(pair, divergence):
    student, teacher, labels = pair
    loss = kd(divergence=divergence)
    assert loss(features(student, labels), features(student.clone(), labels)).item() == pytest.approx(0, abs=1e-6)
    assert loss(features(student, labels), features(teacher, labels)).item() > 1e-3


def test_kd_ignores_padded_positions(pair):
    student, teacher, labels = pair
    loss = kd()
    before = loss(features(student, labels), features(teacher, labels))
    changed = student.clone()
    changed[1, 3:] += 100.0 * torch.randn_like(changed[1, 3:])
    assert loss(features(changed, labels), features(teacher, labels)).item() == pytest.approx(before.item())
    changed[0, 0, 0] += 5.0  # one logit: a uniform shift would not change the softmax
    assert loss(features(changed, labels), features(teacher, labels)).item() != pytest.approx(before.item())


def test_teacher_vocabulary_padding_is_compared_on_the_shared_vocabulary(pair):
    student, teacher, labels = pair
    padded = torch.cat([teacher, torch.full((BATCH, SEQ, 3), 50.0, dtype=teacher.dtype)], dim=-1)
    loss = kd()
    assert loss(features(student, labels), features(padded, labels)).item() == pytest.approx(
        loss(features(student, labels), features(teacher, labels)).item()
    )


def test_kd_is_float32_inside_for_half_precision_inputs(pair):
    student, teacher, labels = pair
    loss = kd()(features(student.bfloat16(), labels), features(teacher.bfloat16(), labels))
    assert loss.dtype == torch.float32


def test_gradient_reaches_the_student_only(pair):
    student, teacher, labels = pair
    student.requires_grad_(True)
    kd()(features(student, labels), features(teacher, labels)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert student.grad[1, 3:].abs().sum() == 0  # padded positions get no gradient
    assert not teacher.requires_grad


def test_ce_matches_torch_cross_entropy(pair):
    student, _, labels = pair
    losses, weights = build_losses({"ce": {"weight": 0.5}}, model_pair=None)
    expected = F.cross_entropy(student.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    assert losses["ce"](features(student, labels), None).item() == pytest.approx(expected.item())
    assert weights == {"ce": 0.5}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kd": {"divergence": "kl"}}, "losses.kd.divergence 'kl' is unknown"),
        ({"kd": {"temprature": 2}}, "Did you mean 'temperature'"),
        ({"kd": {"beta": 1.5}}, "losses.kd.beta must lie strictly between 0 and 1"),
        ({"ckaa": {}}, "unknown key 'losses.ckaa'. Did you mean 'cka'"),
    ],
)
def test_bad_loss_configs_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_losses(spec, model_pair=TEACHER_PRESENT)


def test_kd_without_a_teacher_is_refused():
    with pytest.raises(ConfigError, match="compares with a teacher"):
        build_losses({"kd": {}}, model_pair=None)


def full_tensor_reference(name, student, teacher, labels, temperature, vocab, beta=0.5, alpha=0.1):
    """The logit terms as they were first written: float32 copies of the whole [batch, seq, vocab] logits."""
    from ds_distill.objectives.divergences import divergence

    mask = labels != -100
    if name == "ce":
        per_token = F.cross_entropy(
            student[..., :vocab].float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
        ).view_as(labels)
        return torch.where(mask, per_token, 0.0).sum() / mask.sum()
    log_s = F.log_softmax(student[..., :vocab].float() / temperature, -1)
    log_t = F.log_softmax(teacher[..., :vocab].float() / temperature, -1)
    per_token = divergence(name, log_t, log_s, beta, alpha)
    scale = temperature if name == "tvd" else temperature**2
    return torch.where(mask, per_token, 0.0).sum() / mask.sum() * scale


@pytest.mark.parametrize("name", ["ce", "forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("vocab_size", [None, 45])
def test_chunked_terms_equal_the_full_tensor_formulas_in_value_and_gradient(monkeypatch, name, temperature, vocab_size):
    """Several chunks (3 rows each), padding between targets, a teacher with a padded vocabulary: the same
    value and the same gradient (rel 1e-6, float32) as the formula on whole float32 tensors."""
    from ds_distill.objectives import logits as logit_losses

    generator = torch.Generator().manual_seed(3)
    student = torch.randn(3, 11, 50, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 11, 53, generator=generator)  # 3 rows of vocabulary padding past the student's
    labels = torch.randint(0, 45, (3, 11), generator=generator)
    labels[0, 7:] = labels[2, :2] = labels[1, 4] = -100
    monkeypatch.setattr(logit_losses, "CHUNK_ELEMENTS", 3 * 50)
    if name == "ce":
        losses, _ = build_losses({"ce": {}}, model_pair=None, vocab_size=vocab_size)
    else:
        losses, _ = build_losses(
            {"kd": {"divergence": name, "temperature": temperature}}, model_pair=TEACHER_PRESENT, vocab_size=vocab_size
        )
    loss = next(iter(losses.values()))(features(student, labels), features(teacher, labels))
    (grad,) = torch.autograd.grad(loss, student)
    vocab = vocab_size or 50
    expected = full_tensor_reference(name, student, teacher, labels, 1.0 if name == "ce" else temperature, vocab)
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)


def test_target_indices_from_the_host_select_the_same_positions(pair):
    from ds_distill.models import adapter_for
    from ds_distill.objectives.features import target_index

    student, teacher, labels = pair
    loss = kd()
    given = {**features(student, labels), "target_index": target_index(adapter_for(TEACHER), labels)}
    assert (
        loss(given, features(teacher, labels)).item()
        == loss(features(student, labels), features(teacher, labels)).item()
    )


def test_logit_terms_never_hold_a_float32_copy_of_the_whole_logits(monkeypatch):
    """bf16 logits of 2 x 256 positions x 8192 words: the forward and backward of CE + KD together, as the
    trainer computes them, hold less than one float32 copy of them (the terms as first written held several
    float32 copies each), at 2^16 logits per chunk."""
    from ds_distill.objectives import logits as logit_losses
    from ds_distill.objectives.logits import logit_terms
    from ds_distill.planner.trace import LiveTensorBytes

    monkeypatch.setattr(logit_losses, "CHUNK_ELEMENTS", 2**16)
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 256, 8192, generator=generator).bfloat16().requires_grad_(True)
    teacher = torch.randn(2, 256, 8192, generator=generator).bfloat16()
    labels = torch.randint(0, 8192, (2, 256), generator=generator)
    labels[1, 200:] = -100
    losses, weights = build_losses({"ce": {}, "kd": {"temperature": 2.0}}, model_pair=TEACHER_PRESENT)
    tracker = LiveTensorBytes()
    tracker.exclude([student, teacher, labels])
    terms = {name: (loss, weights[name]) for name, loss in losses.items()}
    with tracker:
        total, _ = logit_terms(terms, features(student, labels), features(teacher, labels))
        total.backward()
    float32_copy = student.numel() * 4
    assert student.grad is not None and student.grad[1, 200:].abs().sum() == 0
    assert tracker.peak < 0.75 * float32_copy, tracker.peak / float32_copy
