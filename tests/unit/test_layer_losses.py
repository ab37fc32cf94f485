"""Layer-wise losses against their definitions, on small tensors and on tiny teacher/student pairs."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from ds_distill import models
from ds_distill.config.losses import LayerMapConfig
from ds_distill.config.run import FromTeacherConfig
from ds_distill.errors import ConfigError
from ds_distill.objectives.attention import relation_kl
from ds_distill.objectives.capture import FeatureCapture
from ds_distill.objectives.features import forward_features
from ds_distill.objectives.hidden import cka_loss
from ds_distill.objectives.layerwise import ModelPair
from ds_distill.objectives.registry import build_losses
from ds_distill.train.student import DistillationModule


def reference_cka_loss(student: torch.Tensor, teacher: torch.Tensor, squared: bool = False) -> float:
    """The design's formula in float64, written out: 1 - ||S^T T|| / sqrt((||S^T S|| + eps)(||T^T T|| + eps))."""
    s = student.double() - student.double().mean(0)
    t = teacher.double() - teacher.double().mean(0)
    cross = torch.linalg.matrix_norm(s.T @ t)
    denominator = (torch.linalg.matrix_norm(s.T @ s) + 1e-8) * (torch.linalg.matrix_norm(t.T @ t) + 1e-8)
    return float(1 - (cross**2 / denominator if squared else cross / denominator.sqrt()))


def random_orthogonal(size: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


class TestCKA:
    teacher = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    student = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))

    def test_zero_for_identical_rotated_and_scaled_copies(self):
        rotated = self.teacher @ random_orthogonal(24, 2)
        for copy in (self.teacher, rotated, 7.5 * self.teacher, 0.01 * rotated + 3.0):  # a shift is centred away
            assert cka_loss(copy, self.teacher).item() == pytest.approx(0.0, abs=1e-5)

    @pytest.mark.parametrize("squared", [False, True])
    def test_matches_the_float64_reference(self, squared):
        expected = reference_cka_loss(self.student, self.teacher, squared)
        assert 0.05 < expected < 1
        assert cka_loss(self.student, self.teacher, squared).item() == pytest.approx(expected, rel=1e-5)
        assert cka_loss(self.student, self.teacher, squared, torch.float64).item() == pytest.approx(expected, rel=1e-7)

    def test_bf16_products_stay_within_1e_3_of_float64_on_massive_activations(self):
        """bf16 d x d products with rows centred and scaled in float32 (bench/cka_precision.py: within 3.5e-4
        on SmolLM2's states); gradients still reach the student in float32."""
        generator = torch.Generator().manual_seed(4)
        student = torch.randn(512, 96, generator=generator) + self.correlated(512, 96, generator)
        teacher = torch.randn(512, 128, generator=generator) + self.correlated(512, 128, generator)
        student[:, :2] *= 300  # massive channels, as in a pre-LN residual stream
        expected = reference_cka_loss(student, teacher)
        student.requires_grad_(True)
        loss = cka_loss(student, teacher, dtype=torch.bfloat16)
        loss.backward()
        assert loss.dtype == torch.float32 and student.grad.dtype == torch.float32
        assert loss.item() == pytest.approx(expected, abs=1e-3)

    @staticmethod
    def correlated(tokens, width, generator):
        """A shared 4-dimensional signal, so the two sides are related and CKA is far from 1."""
        shared = torch.randn(tokens, 4, generator=torch.Generator().manual_seed(5))
        return 3 * shared @ torch.randn(4, width, generator=generator)

    def test_squared_form_is_one_minus_the_square_of_sqrt_cka(self):
        sqrt_cka = 1 - cka_loss(self.student, self.teacher).item()
        assert cka_loss(self.student, self.teacher, squared=True).item() == pytest.approx(1 - sqrt_cka**2, rel=1e-5)

    def test_large_activations_stay_finite_in_float32(self):
        assert cka_loss(3e4 * self.student, 1e4 * self.teacher).item() == pytest.approx(
            reference_cka_loss(self.student, self.teacher), rel=1e-4
        )


def t5_config(d_model: int, layers: int, heads: int) -> transformers.T5Config:
    return transformers.T5Config(
        vocab_size=64,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )


TEACHER = t5_config(32, 4, 4)
STUDENT = t5_config(16, 2, 2)


def build(spec: dict, layer_map: LayerMapConfig | None = None):
    return build_losses(spec, ModelPair(STUDENT, TEACHER, layer_map or LayerMapConfig()))


def seq2seq_features(width: int, layers: int, seed: int, source_mask: torch.Tensor, target_mask: torch.Tensor):
    generator = torch.Generator().manual_seed(seed)
    features = {"encoder.mask": source_mask, "decoder.mask": target_mask}
    for stack, mask in (("encoder", source_mask), ("decoder", target_mask)):
        for layer in range(layers + 1):
            features[f"{stack}.{layer}.hidden"] = torch.randn(*mask.shape, width, generator=generator)
    return features


def test_cka_loss_ignores_padded_rows_and_sums_over_pairs():
    losses, _ = build({"cka": {"normalize": "none"}})
    cka = losses["cka"]
    assert [str(p) for p in cka.pairs] == [
        "encoder 0->0", "encoder 1->2", "encoder 2->4", "decoder 0->0", "decoder 1->2", "decoder 2->4",
    ]  # fmt: skip
    source = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    target = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    student = seq2seq_features(16, 2, 0, source, target)
    teacher = seq2seq_features(32, 4, 1, source, target)
    value = cka(student, teacher)
    expected = sum(
        reference_cka_loss(student[f"{p.stack}.{p.student}.hidden"][student[f"{p.stack}.mask"]],
                           teacher[f"{p.stack}.{p.teacher}.hidden"][student[f"{p.stack}.mask"]])
        for p in cka.pairs
    )  # fmt: skip
    assert value.item() == pytest.approx(expected, rel=1e-5)
    for features in (student, teacher):  # what sits in padded positions must not matter
        for key, tensor in features.items():
            if key.endswith(".hidden"):
                mask = features[f"{key.split('.')[0]}.mask"]
                tensor[~mask] = 1e6
    assert cka(student, teacher).item() == pytest.approx(value.item(), rel=1e-6)


@pytest.mark.parametrize("normalize", ["rms", "layer", "channel"])
def test_cka_normalisations_and_first_position_equal_the_reference_on_transformed_rows(normalize):
    """`normalize` is the reference CKA of rows divided by their RMS (rms), standardised per row (layer) or per
    column over the kept rows (channel); `skip_first` is the reference on the rows without position 0."""
    source = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    target = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    student = seq2seq_features(16, 2, 0, source, target)
    teacher = seq2seq_features(32, 4, 1, source, target)
    for features in (student, teacher):  # a massive first position, as in pre-LN models
        for key, tensor in features.items():
            if key.endswith(".hidden"):
                tensor[:, 0] *= 300

    def transform(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.double()
        if normalize == "rms":
            return rows / (rows.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        if normalize == "layer":
            centred = rows - rows.mean(-1, keepdim=True)
            return centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        return (rows - rows.mean(0)) / rows.std(0, unbiased=False)

    for skip_first in (False, True):
        losses, _ = build({"cka": {"normalize": normalize, "skip_first": skip_first}})
        cka = losses["cka"]
        expected = 0.0
        for p in cka.pairs:
            kept = student[f"{p.stack}.mask"].clone()
            if skip_first:
                kept[:, 0] = False
            expected += reference_cka_loss(
                transform(student[f"{p.stack}.{p.student}.hidden"][kept]),
                transform(teacher[f"{p.stack}.{p.teacher}.hidden"][kept]),
            )
        assert cka(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    raw = build({"cka": {"normalize": "none"}})[0]["cka"](student, teacher).item()
    assert abs(raw - expected) > 1e-3  # the options change the value on these rows


def test_cka_compares_rms_normalised_states_by_default_where_a_model_is_pre_ln():
    """T5 is pre-LN: `auto` is rms there and says so; a pair of post-LN BERTs compares raw states."""
    cka = build({"cka": {}})[0]["cka"]
    assert cka.normalization == "rms" and any("rms-normalised" in note for note in cka.notes)
    bert = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32)  # fmt: skip
    post_ln = build_losses({"cka": {}}, ModelPair(bert, bert, LayerMapConfig()))[0]["cka"]
    assert post_ln.normalization == "none" and not post_ln.notes


def reference_log_relation(x: torch.Tensor, b: int, i: int, keys: list[int], head: int, heads: int) -> torch.Tensor:
    width = x.shape[-1] // heads
    x = x[b, :, head * width : (head + 1) * width].double()
    return torch.log_softmax(torch.stack([x[i] @ x[j] / math.sqrt(width) for j in keys]), 0)


def reference_relation_kl(student, teacher, mask, heads, causal) -> float:
    """KL(teacher || student) of softmax(x x^T / sqrt(d_r)) per relation head, with explicit loops, float64."""
    total, rows = 0.0, 0
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if not mask[b, i]:
                continue
            keys = [j for j in range(mask.shape[1]) if mask[b, j] and (not causal or j <= i)]
            for head in range(heads):
                log_t = reference_log_relation(teacher, b, i, keys, head, heads)
                log_s = reference_log_relation(student, b, i, keys, head, heads)
                total += float((log_t.exp() * (log_t - log_s)).sum())
                rows += 1
    return total / rows


@pytest.mark.parametrize("causal", [False, True])
def test_relation_kl_matches_the_definition(causal):
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 6, 8, generator=generator), torch.randn(2, 6, 16, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    value = relation_kl((student, student), (teacher, teacher), mask, mask, 2, causal, "test")  # summed over rows
    expected = reference_relation_kl(student, teacher, mask, 2, causal)
    assert value.item() / mask.sum().item() == pytest.approx(expected, rel=1e-5)
    assert value.item() > 0
    assert relation_kl((teacher, teacher), (teacher, teacher), mask, mask, 2, causal, "test").item() == pytest.approx(
        0.0, abs=1e-6
    )
    changed = teacher.clone()
    changed[1, 4:] = 100.0  # padded positions
    assert relation_kl((student, student), (changed, changed), mask, mask, 2, causal, "t").item() == pytest.approx(
        value.item(), rel=1e-6
    )


def test_relation_heads_must_divide_the_width():
    x = torch.randn(1, 3, 12)
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="5 relation heads do not divide a projection width of 12"):
        relation_kl((x, x), (x, x), mask, mask, 5, False, "losses.relation")


def run_pair(
    spec: dict, layer_map: LayerMapConfig | None = None, teacher=TEACHER, student_dims=None, compile: bool = False
):
    """One step of the real code path: teacher forward under no_grad with its hooks, then the student module."""
    torch.manual_seed(0)
    student_config = models.adapter_for(teacher).shrink(teacher, student_dims or FromTeacherConfig(2, 2, 16, 32, 2))
    teacher_model = models.adapter_for(teacher).from_config(teacher).eval()
    student_model = models.adapter_for(student_config).from_config(student_config)
    losses, weights = build_losses(spec, ModelPair(student_config, teacher, layer_map or LayerMapConfig()))
    module = DistillationModule(student_model, losses, weights, compile=compile)
    adapter = models.adapter_for(teacher)
    capture = FeatureCapture(teacher_model, adapter, set().union(*(loss.teacher_keys for loss in losses.values())))
    batch = {
        "input_ids": torch.randint(2, 64, (2, 6)),
        "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
        "labels": torch.tensor([[5, 6, 7, 1], [8, 9, -100, -100]]),
    }
    batch["decoder_input_ids"] = teacher_model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    with torch.no_grad():
        teacher_forward = torch.compile(teacher_model) if compile else teacher_model
        teacher_features = forward_features(teacher_forward, adapter, batch, capture)
    total, terms = module(batch, teacher_features)
    total.backward()
    return module, teacher_model, total, terms


@pytest.mark.parametrize(
    "spec",
    [
        {"cka": {}},
        {"linear": {}},
        {"hidden_cosine": {"projection": "low_rank", "rank": 4}},
        {"embedding_mse": {"projection": "linear"}},
        {"relation": {"relation_heads": 2}},
        {"miniend": {"relation_heads": 2, "encoder_self": True, "cross_query_key": True}},
        {"attention_kl": {}},
        {"attention_mse": {}},
        {"makd": {"rank": 4}},
    ],
    ids=lambda spec: next(iter(spec)),
)
def test_gradients_reach_the_student_and_projections_never_the_teacher(spec):
    module, teacher_model, total, terms = run_pair(spec)
    assert torch.isfinite(total) and total.item() > 0
    assert set(terms) == set(spec)
    assert all(p.grad is None for p in teacher_model.parameters())
    student_grads = [p.grad for p in module.student.parameters() if p.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
    for name, parameter in module.losses.named_parameters():  # projections and aligners train with the student
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_makd_stages_switch_aspects_by_step():
    spec = {"makd": {"rank": 4, "stages": [{"steps": 2, "aspects": ["attention_output", "ffn_output"]}]}}
    module, _, staged, _ = run_pair(spec)
    module.set_step(2)
    assert module.losses["makd"].active_aspects() == ("attention", "hidden", "attention_output", "ffn_output")
    _, _, everything, _ = run_pair({"makd": {"rank": 4}})
    assert 0 < staged.item() < everything.item()


def test_head_counts_that_differ_are_averaged_and_said():
    losses, _ = build({"attention_kl": {}})
    assert losses["attention_kl"].average_heads
    assert "2 attention heads and the teacher 4; comparing head-averaged" in losses["attention_kl"].notes[0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"hidden_mse": {}}, "student width 16 differs from teacher width 32; set losses.hidden_mse.projection"),
        ({"cka": {"dtype": "float16"}}, "choose one of bfloat16, float32, float64"),
        ({"relation": {"layer_map": {"include_embeddings": True}}}, "layer 0 .* has no attention"),
        ({"makd": {"stages": [{"steps": 0, "aspects": []}]}}, "each stage is"),
        ({"makd": {"aspect_weights": {"ffn": 1.0}}}, "unknown aspects"),
        ({"cka": {"layer_map": {"encoder": "1:5"}}}, "losses.cka.layer_map.encoder maps teacher layer 5"),
        ({"cka": {"weight": 0}}, "every loss term has weight 0"),
        ({"relation": {"relation_heads": 5}}, "relation_heads 5 does not divide the student's attention projection"),
        ({"embedding_mse": {"layer_map": {"encoder": "last"}}}, "always pairs the embeddings"),
        ({"hidden_mse": {"normalize": "batch"}}, "normalize 'batch' is unknown; choose one of auto, none, rms"),
        ({"makd": {"normalize": "batch"}}, "normalize 'batch' is unknown"),
        ({"attention_kl": {"layer_map": {"encoder": "0:0", "decoder": "0:0"}}}, "has no attention"),
    ],
)
def test_bad_options_fail_before_weights_load(spec, message):
    with pytest.raises(ConfigError, match=message):
        build(spec)


def test_makd_builds_no_aligner_for_an_aspect_at_weight_zero():
    losses, _ = build({"makd": {"aspect_weights": {"ffn_output": 0}}})
    assert set(losses["makd"].aligners) == {"hidden", "attention_output"}
    assert not any(key.endswith("ffn_output") for key in losses["makd"].student_keys)


def test_captured_attention_of_a_training_model_is_a_distribution():
    """Eager attention returns probabilities after dropout; capture switches that dropout off at mapped layers."""
    config = t5_config(32, 2, 4)
    config.dropout_rate = 0.3
    model = models.adapter_for(config).from_config(config).train()
    capture = FeatureCapture(
        model, models.adapter_for(config), {"encoder.1.attention_probs", "decoder.2.attention_probs"}
    )
    batch = {"input_ids": torch.randint(2, 64, (2, 6)), "decoder_input_ids": torch.randint(2, 64, (2, 4))}
    with capture.recording():
        model(**batch)
    for key, probs in capture.pop().items():
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), msg=key)
    assert model.encoder.block[0].layer[0].SelfAttention.dropout == 0.0  # layer 1 is block 0: off
    assert model.encoder.block[1].layer[0].SelfAttention.dropout == 0.3  # unmapped blocks keep their dropout


def test_models_that_drop_layers_at_random_are_refused():
    config = transformers.BartConfig(
        vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layerdrop=0.1,
    )  # fmt: skip
    model = models.adapter_for(config).from_config(config)
    with pytest.raises(ConfigError, match="set its layerdrop to 0"):
        FeatureCapture(model, models.adapter_for(config), {"encoder.1.hidden"})


def test_a_map_with_nothing_to_compare_is_refused():
    with pytest.raises(ConfigError, match="losses.attention_kl: its layer map leaves no layer pair"):
        build({"attention_kl": {}}, LayerMapConfig(encoder="0:0", decoder="0:0"))


def test_compiled_forwards_give_the_eager_losses_and_gradients():
    """train.torch_compile: the hooks that capture features keep working inside compiled graphs."""
    spec = {"ce": {}, "kd": {}, "cka": {}}
    eager, _, eager_total, eager_terms = run_pair(spec)
    compiled, _, compiled_total, compiled_terms = run_pair(spec, compile=True)
    assert compiled_total.item() == pytest.approx(eager_total.item(), rel=1e-4)
    assert compiled_terms["cka"].item() == pytest.approx(eager_terms["cka"].item(), rel=1e-4)
    for (name, expected), actual in zip(eager.student.named_parameters(), compiled.student.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-3, atol=1e-5, msg=name)
    assert "training_forward" not in dict(compiled.named_modules())  # weights are listed once in checkpoints


def test_hidden_mse_can_compare_layer_normed_states():
    pair = ModelPair(TEACHER, TEACHER, LayerMapConfig())
    raw, _ = build_losses({"hidden_mse": {"normalize": False}}, pair)
    normed, _ = build_losses({"hidden_mse": {"normalize": True}}, pair)  # the option's boolean form: layer norm
    source = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    target = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    teacher = seq2seq_features(32, 4, 0, source, target)
    student = seq2seq_features(32, 4, 1, source, target)
    for key in [k for k in teacher if k.endswith(".hidden")]:
        teacher[key] = teacher[key] * 300 + 40  # a pre-LN residual stream's scale and offset

    def reference(s, t):
        norm = torch.nn.functional.layer_norm
        return float(((norm(s, s.shape[-1:]) - norm(t, t.shape[-1:])) ** 2).mean())

    expected = sum(
        reference(student[f"{p.stack}.{p.student}.hidden"][student[f"{p.stack}.mask"]],
                  teacher[f"{p.stack}.{p.teacher}.hidden"][student[f"{p.stack}.mask"]])
        for p in normed["hidden_mse"].pairs
    )  # fmt: skip
    assert normed["hidden_mse"](student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert raw["hidden_mse"](student, teacher).item() > 1e4 * expected
    scaled = {k: v * 300 + 40 if k.endswith(".hidden") else v for k, v in teacher.items()}
    assert normed["hidden_mse"](scaled, teacher).item() == pytest.approx(0, abs=1e-4)


def random_features(loss, masks: dict[str, torch.Tensor], widths: dict[str, int], seed: int, scale: float = 1.0):
    """Random captured features for every key `loss` reads, with `{stack}.mask`; a few channels 100x the rest, as
    in a pre-LN residual stream. `widths`: {"student": d_S, "teacher": d_T}."""
    generator = torch.Generator().manual_seed(seed)
    student, teacher = dict(masks), dict(masks)
    for role, features, keys in (("student", student, loss.student_keys), ("teacher", teacher, loss.teacher_keys)):
        for key in sorted(keys):
            mask = masks[f"{key.split('.')[0]}.mask"]
            values = torch.randn(*mask.shape, widths[role], generator=generator)
            values[..., :2] *= 100
            features[key] = scale * values
    return student, teacher


def rms_normed(x: torch.Tensor) -> torch.Tensor:
    """Each token's vector over its root mean square (an RMSNorm without weight)."""
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)


def channel_standardized(x: torch.Tensor) -> torch.Tensor:
    """Each channel centred and divided by its std over the rows (the micro-batch's real tokens)."""
    centred = x - x.mean(0, keepdim=True)
    return centred / torch.sqrt((centred**2).mean(0, keepdim=True) + 1e-6)


SEQ2SEQ_MASKS = {
    "encoder.mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool),
    "decoder.mask": torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool),
}


@pytest.mark.parametrize("normalize, formula", [("rms", rms_normed), ("channel", channel_standardized)])
def test_hidden_mse_normalizations_match_their_formulas(normalize, formula):
    """MSE between normalised states, padded positions left out of the channel statistics and of the mean."""
    losses, _ = build_losses({"hidden_mse": {"normalize": normalize}}, ModelPair(TEACHER, TEACHER, LayerMapConfig()))
    loss = losses["hidden_mse"]
    student, teacher = random_features(loss, SEQ2SEQ_MASKS, {"student": 32, "teacher": 32}, 0)
    expected = 0.0
    for p in loss.pairs:
        mask = SEQ2SEQ_MASKS[f"{p.stack}.mask"]
        s = student[f"{p.stack}.{p.student}.hidden"][mask]
        t = teacher[f"{p.stack}.{p.teacher}.hidden"][mask]
        expected += float(((formula(s) - formula(t)) ** 2).mean())
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    for features in (student, teacher):  # what sits in padded positions must not matter
        for key in [k for k in features if k.endswith(".hidden")]:
            features[key][~SEQ2SEQ_MASKS[f"{key.split('.')[0]}.mask"]] = 1e6
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_linear_normalizes_the_projected_student_and_the_teacher():
    losses, _ = build({"linear": {"normalize": "rms"}})
    loss = losses["linear"]
    student, teacher = random_features(loss, SEQ2SEQ_MASKS, {"student": 16, "teacher": 32}, 0)
    expected = 0.0
    for p in loss.pairs:
        mask = SEQ2SEQ_MASKS[f"{p.stack}.mask"]
        projected = loss.aligners[0](student[f"{p.stack}.{p.student}.hidden"][mask]).detach()
        expected += float(
            ((rms_normed(projected) - rms_normed(teacher[f"{p.stack}.{p.teacher}.hidden"][mask])) ** 2).mean()
        )
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def small_config(model_type: str) -> transformers.PretrainedConfig:
    sizes = {"vocab_size": 64}
    bart_like = dict(
        d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32,
    )  # fmt: skip
    return {
        "t5": lambda: t5_config(16, 2, 2),
        "llama": lambda: transformers.LlamaConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **sizes
        ),
        "gpt2": lambda: transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, **sizes),
        "mbart": lambda: transformers.MBartConfig(**bart_like, **sizes),
        "bart": lambda: transformers.BartConfig(**bart_like, **sizes),
        "bert": lambda: transformers.BertConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **sizes
        ),
    }[model_type]()


@pytest.mark.parametrize(
    "model_type, pre_layer_norm",
    [("t5", True), ("llama", True), ("gpt2", True), ("mbart", True), ("bart", False), ("bert", False)],
)
@pytest.mark.parametrize("term", ["hidden_mse", "linear", "makd"])
def test_mse_terms_normalize_pre_ln_residual_streams_by_default(model_type, pre_layer_norm, term):
    """Default `normalize: auto`: RMS-normalised states on pre-LN families (raw block outputs in the hundreds or
    thousands would swamp CE and KD), raw ones on post-LN families (BERT, BART), whose blocks end in a layer norm."""
    config = small_config(model_type)
    pair = ModelPair(config, config, LayerMapConfig())
    spec = {"aspect_weights": {"attention": 0}} if term == "makd" else {}
    default = build_losses({term: spec}, pair)[0][term]
    rms, raw = (build_losses({term: {**spec, "normalize": n}}, pair)[0][term] for n in ("rms", "none"))
    for other in (rms, raw):  # the same projection or aligner weights as the default's
        other.load_state_dict(default.state_dict())
    stacks = models.adapter_for(config).layout
    masks = {f"{stack}.mask": torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool) for stack in stacks}
    student, teacher = random_features(default, masks, {"student": 16, "teacher": 16}, 0, scale=30.0)
    value = default(student, teacher).item()
    assert value == pytest.approx((rms if pre_layer_norm else raw)(student, teacher).item(), rel=1e-6)
    assert (value < 100) == pre_layer_norm  # normalised: about 2 per compared state; raw: 1e6 and more
    assert any("rms-normalised" in note for note in default.notes) == pre_layer_norm


def test_makd_normalizes_its_mse_aspects():
    """hidden, attention_output and ffn_output each compare RMS-normalised states under `normalize: rms`."""
    losses, _ = build_losses(
        {"makd": {"normalize": "rms", "aspect_weights": {"attention": 0}}},
        ModelPair(TEACHER, TEACHER, LayerMapConfig()),
    )
    loss = losses["makd"]
    student, teacher = random_features(loss, SEQ2SEQ_MASKS, {"student": 32, "teacher": 32}, 0)
    expected = 0.0
    for p in loss.pairs:
        mask = SEQ2SEQ_MASKS[f"{p.stack}.mask"]
        for site in loss.pair_sites(p):
            s = student[f"{p.stack}.{p.student}.{site}"][mask]
            t = teacher[f"{p.stack}.{p.teacher}.{site}"][mask]
            expected += float(((rms_normed(s) - rms_normed(t)) ** 2).mean())
    assert {site for p in loss.pairs for site in loss.pair_sites(p)} == {"hidden", "attention_output", "ffn_output"}
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    scaled = {k: 250.0 * v if not k.endswith(".mask") else v for k, v in student.items()}
    assert loss(scaled, student).item() == pytest.approx(0, abs=1e-6)  # scale alone no longer counts


class SyncingOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that make a host wait for the device: a count (nonzero, a boolean index, masked_select) or
    a value (item)."""

    COUNTING = {torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
                torch.ops.aten._local_scalar_dense.default}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        if func in self.COUNTING or boolean_index:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_terms_of_a_step_never_wait_for_the_device():
    """With the target positions counted on the host (as the trainer passes them), neither the forward nor the
    backward of the logit and layer-wise terms asks the device for a count or a value."""
    from ds_distill.objectives.features import target_index
    from ds_distill.objectives.registry import weighted_terms

    spec = {
        "ce": {},
        "kd": {},
        "cka": {},
        "linear": {},
        "hidden_mse": {"normalize": "channel", "projection": "linear"},
        "makd": {"rank": 4},
    }
    torch.manual_seed(0)
    student_config = models.adapter_for(TEACHER).shrink(TEACHER, FromTeacherConfig(2, 2, 16, 32, 2))
    teacher_model = models.adapter_for(TEACHER).from_config(TEACHER).eval()
    student_model = models.adapter_for(student_config).from_config(student_config)
    losses, weights = build_losses(spec, ModelPair(student_config, TEACHER, LayerMapConfig()))
    adapter = models.adapter_for(TEACHER)
    batch = {
        "input_ids": torch.randint(2, 64, (2, 6)),
        "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
        "labels": torch.tensor([[5, 6, 7, 1], [8, 9, -100, -100]]),
    }
    batch["decoder_input_ids"] = teacher_model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    batch["target_index"] = target_index(adapter, batch["labels"])
    keys = {
        side: set().union(*(getattr(loss, f"{side}_keys") for loss in losses.values()))
        for side in ("student", "teacher")
    }
    with torch.no_grad():
        teacher = forward_features(
            teacher_model, adapter, batch, FeatureCapture(teacher_model, adapter, keys["teacher"])
        )
    student = forward_features(student_model, adapter, batch, FeatureCapture(student_model, adapter, keys["student"]))
    with SyncingOps() as syncs:
        total, _ = weighted_terms(losses, weights, student, teacher, None)
        total.backward()
    assert syncs.seen == []
