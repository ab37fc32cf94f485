"""Width surgery on every listed family: cuts and HomoDistil exports compute what the masked teacher computes,
heads ranked per block, query/key channels apart, one rounding rule for depth, refusals before weights load."""

from __future__ import annotations

import pytest
import torch
import transformers

from ds_distill import models
from ds_distill.config.run import FromTeacherConfig, PruneConfig
from ds_distill.errors import ConfigError
from ds_distill.objectives import layer_map
from ds_distill.surgery import cut, prune, students
from ds_distill.surgery.importance import activation_scores
from ds_distill.surgery.shapes import shape_of
from tests.unit.test_slicing import logits

SMALL = dict(vocab_size=96)
BART_LIKE = dict(
    d_model=32,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_layers=2,
    decoder_layers=2,
    max_position_embeddings=32,
    dropout=0.0,
    attention_dropout=0.0,
)
T5_LIKE = dict(
    d_model=32,
    d_ff=64,
    d_kv=8,
    num_heads=4,
    num_layers=2,
    num_decoder_layers=2,
    decoder_start_token_id=0,
    dropout_rate=0.0,
)
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
BERT_LIKE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=40,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
EVERY_FAMILY = {  # each model type `ds-distill list` names, with the settings that change how widths are cut
    "t5_tied": transformers.T5Config(**SMALL, **T5_LIKE, feed_forward_proj="relu"),  # scales outputs by d^-0.5
    "t5": transformers.T5Config(**SMALL, **T5_LIKE, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "mt5": transformers.MT5Config(**SMALL, **T5_LIKE, tie_word_embeddings=False),
    "umt5": transformers.UMT5Config(**SMALL, **T5_LIKE, tie_word_embeddings=False),
    "bart": transformers.BartConfig(**SMALL, **BART_LIKE, scale_embedding=True),  # embeddings x sqrt(d)
    "mbart": transformers.MBartConfig(**SMALL, **BART_LIKE, scale_embedding=True),
    "gpt2": transformers.GPT2Config(**SMALL, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0),
    "llama_gqa": transformers.LlamaConfig(**SMALL, **LLAMA_LIKE, num_key_value_heads=2),
    "llama_mha": transformers.LlamaConfig(**SMALL, **LLAMA_LIKE, num_key_value_heads=4),
    "qwen2": transformers.Qwen2Config(**SMALL, **LLAMA_LIKE, num_key_value_heads=2),
    "qwen3": transformers.Qwen3Config(**SMALL, **LLAMA_LIKE, num_key_value_heads=2, head_dim=16),  # its own width
    "mistral": transformers.MistralConfig(**SMALL, **LLAMA_LIKE, num_key_value_heads=2),
    "bert": transformers.BertConfig(**SMALL, **BERT_LIKE),
    "roberta": transformers.RobertaConfig(**SMALL, **BERT_LIKE, pad_token_id=1),
}  # fmt: skip


def build(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.adapter_for(config).from_config(config).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a wrong cut or scale shows
        for name, tensor in model.named_parameters():
            if "norm" in name.lower() and tensor.dim() == 1:
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("bias") and "relative_attention" not in name:
                tensor.uniform_(-0.2, 0.2)
            elif name.endswith(("shared.weight", "embed_tokens.weight")) and getattr(config, "scale_embedding", False):
                # BART's fold (positions x sqrt(d_student / d_teacher) before layernorm_embedding) is exact up
                # to that norm's epsilon of 1e-5 against the embeddings' variance: ~1 in trained models, where
                # an init of std 0.02 would make the epsilon visible
                tensor.normal_(0, 0.5)
    return model


def batches(config, count: int = 2):
    generator = torch.Generator().manual_seed(3)
    out = []
    for _ in range(count):
        ids = torch.randint(3, 96, (3, 8), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0  # padding counts nowhere
        batch = {"input_ids": ids, "attention_mask": mask}
        if models.adapter_for(config).kind == "seq2seq":
            batch["labels"] = torch.randint(3, 96, (3, 5), generator=generator)
            batch["decoder_input_ids"] = torch.cat([torch.zeros(3, 1, dtype=torch.long), batch["labels"][:, :-1]], 1)
        out.append(batch)
    return out


def mask_to(pruner: prune.Pruner, plan: cut.SlicePlan) -> None:
    """Sets a full-depth pruner's masks to what `plan` keeps (whole heads)."""
    for key, mask in pruner.masks.items():
        if key == ("hidden",):
            kept = plan.hidden
        elif key[0] == "ffn":
            kept = plan.ffn[key[1:]]
        else:
            kind, attention, stack, block = key
            kept = plan.attention[(attention, stack, 0 if block is None else block)].units
        mask.zero_()
        mask[kept] = True


def shrunk(config, **dims):
    return models.adapter_for(config).shrink(config, FromTeacherConfig(**dims))


@pytest.mark.parametrize("family", sorted(EVERY_FAMILY))
def test_every_family_cut_by_importance_and_pruned_computes_what_the_masked_model_computes(family, tmp_path):
    config = EVERY_FAMILY[family]
    adapter = models.adapter_for(config)
    teacher = build(config)
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    # cut by importance: half the hidden channels and FFN neurons, 2 of 4 heads (whole), every block
    shape = shape_of(config)
    student_config = shrunk(config, d_model=16 if adapter.narrow_heads else shape.width // 2, d_ff=40, num_heads=2)
    if adapter.narrow_heads:  # keep whole heads here (narrowing has its own test): 2 heads of 8 channels
        assert shape_of(student_config).head_dim == shape.head_dim
    layers = {stack: list(range(depth)) for stack, depth in shape.depths.items()}
    plan = cut.make_plan(config, student_config, layers, activation_scores(teacher, batches(config)))
    student = adapter.from_config(student_config).eval()
    student.load_state_dict(cut.cut_state(teacher.state_dict(), config, student_config, plan))
    student.save_pretrained(tmp_path / "cut")
    reloaded = adapter.from_pretrained(str(tmp_path / "cut")).eval()
    masked = build(config)
    widths = PruneConfig(d_model=shape_of(student_config).width, num_heads=2, steps=1)
    mask_to(prune.Pruner(masked, widths), plan)
    torch.testing.assert_close(logits(reloaded, ids), logits(masked, ids), rtol=1e-5, atol=1e-5)

    # HomoDistil: prune a little from ranked scores, export dense, reload
    target = PruneConfig(
        d_model=shape.width - 8, d_ff=56, num_heads=2 * shape.groups if shape.groups > 1 else 3, steps=4
    )
    if adapter.narrow_heads:
        target.d_model, target.num_heads = 24, 4  # 4 heads of 6 channels: query/key and value/output apart
    pruned = build(config)
    pruner = prune.Pruner(pruned, target)
    generator = torch.Generator().manual_seed(7)
    for score in pruner.scores.values():
        score.copy_(torch.rand(score.shape, generator=generator, dtype=torch.float64))
    pruner.update(target.steps)
    target_config = prune.target_config(config, target)
    dense = adapter.from_config(target_config)
    dense.load_state_dict(cut.cut_state(pruned.state_dict(), config, target_config, pruner.plan()))
    dense.save_pretrained(tmp_path / "pruned")
    exported = adapter.from_pretrained(str(tmp_path / "pruned")).eval()
    torch.testing.assert_close(logits(exported, ids), logits(pruned, ids), rtol=1e-5, atol=1e-5)


def test_width_dependent_scales_are_folded_where_the_family_has_them():
    """Without the fold a cut tied T5 computes logits sqrt(32 / 16) too sharp: the test above fails by that much."""
    config = EVERY_FAMILY["t5_tied"]
    teacher = build(config)
    student_config = shrunk(config, d_model=16)
    plan = cut.make_plan(config, student_config, {"encoder": [0, 1], "decoder": [0, 1]})
    state = cut.cut_state(teacher.state_dict(), config, student_config, plan)
    norm = teacher.state_dict()["decoder.final_layer_norm.weight"][:16]
    torch.testing.assert_close(state["decoder.final_layer_norm.weight"], norm * (16 / 32) ** 0.5)
    bart = EVERY_FAMILY["bart"]
    state = cut.cut_state(build(bart).state_dict(), bart, shrunk(bart, d_model=16, num_heads=2),
                          cut.make_plan(bart, shrunk(bart, d_model=16, num_heads=2), {"encoder": [0, 1], "decoder": [0, 1]}))  # fmt: skip
    positions = build(bart).state_dict()["model.encoder.embed_positions.weight"][:, :16]
    torch.testing.assert_close(state["model.encoder.embed_positions.weight"], positions * (16 / 32) ** 0.5)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama_mha", "llama_gqa", "bart"])
def test_heads_are_ranked_and_kept_per_block(family):
    """A teacher whose dead heads differ by block keeps each block's own live heads."""
    config = EVERY_FAMILY[family]
    teacher = build(config)
    adapter = models.adapter_for(config)
    shape = shape_of(config)
    dead = {0: 0, 1: shape.units - 1}  # block -> the key/value group whose values (so outputs) are zero
    width = shape.heads * shape.head_dim
    with torch.no_grad():
        for block, unit in dead.items():
            values, site = adapter.site(teacher, next(iter(shape.depths)), block + 1, "self_v")
            rows = slice(unit * shape.head_dim, (unit + 1) * shape.head_dim)
            if site.chunk:  # GPT-2's [q | k | v] Conv1D, [in, 3 x width]
                rows = slice(2 * width + rows.start, 2 * width + rows.stop)
                values.weight[:, rows] = 0
            else:
                values.weight[rows] = 0
            if values.bias is not None:
                values.bias[rows] = 0
    scores = activation_scores(teacher, batches(config))
    if adapter.narrow_heads:
        student = shrunk(config, num_heads=3, d_model=24)
    else:
        student = shrunk(config, num_heads=shape.heads - shape.groups)
    stack = next(iter(shape.depths))
    plan = cut.make_plan(config, student, {s: list(range(d)) for s, d in shape.depths.items()}, scores)
    for block, unit in dead.items():
        kept = plan.attention[("self", stack, block)].units
        assert unit not in kept and len(kept) == shape.units - 1, (block, kept)


def test_t5_keeps_one_head_set_per_stack():
    config = EVERY_FAMILY["t5"]
    scores = activation_scores(build(config), batches(config))
    assert ("heads", "self", "encoder", None) in scores and ("heads", "self", "encoder", 0) not in scores
    plan = cut.make_plan(config, shrunk(config, num_heads=2), {"encoder": [0, 1], "decoder": [0, 1]}, scores)
    assert plan.attention[("self", "encoder", 0)].heads == plan.attention[("self", "encoder", 1)].heads


def test_query_key_channels_are_ranked_by_the_scores_they_form_not_by_values():
    """Channel 7 of each head carries values but no query/key; channel 0 forms scores but carries no value."""
    config = EVERY_FAMILY["bert"]
    teacher = build(config)
    with torch.no_grad():
        for layer in teacher.bert.encoder.layer:
            attention = layer.attention.self
            for head in range(4):
                attention.query.weight[head * 8 + 7] = 0
                attention.query.bias[head * 8 + 7] = 0
                attention.key.weight[head * 8 + 7] = 0
                attention.key.bias[head * 8 + 7] = 0
                attention.value.weight[head * 8] = 0
                attention.value.bias[head * 8] = 0
    scores = activation_scores(teacher, batches(config))
    plan = cut.make_plan(config, shrunk(config, d_model=28), {"encoder": [0, 1]}, scores)
    attention = plan.attention[("self", "encoder", 0)]
    assert all(7 not in channels and 0 in channels for channels in attention.qk.values())
    assert all(0 not in channels and 7 in channels for channels in attention.vo.values())


@pytest.mark.parametrize(("teacher", "student"), [(24, 16), (24, 12), (30, 8), (12, 6), (6, 4)])
def test_alternate_blocks_are_the_blocks_the_uniform_layer_map_pairs(teacher, student):
    pairs = layer_map.uniform(student, teacher)
    assert cut.choose_layers("alternate", teacher, student) == [t - 1 for _, t in pairs]


def test_alternate_rounds_half_up():
    assert cut.choose_layers("alternate", 24, 16)[:4] == [1, 2, 4, 5]  # 1.5 -> 2, 4.5 -> 5 (1-based)


def test_a_pruned_head_gets_no_gradient_and_no_share_of_the_hidden_scores():
    config = EVERY_FAMILY["llama_mha"]
    model = build(config).train()
    model.set_attn_implementation("eager")  # attention probabilities, as attention losses capture them
    pruner = prune.Pruner(model, PruneConfig(num_heads=3, steps=1))
    pruner.masks[("heads", "self", "decoder", 0)][0] = False  # head 0 of block 0 pruned
    ids = torch.randint(3, 96, (2, 6))
    out = model(input_ids=ids, output_attentions=True)
    probs = out.attentions[0]  # an attention loss on every head still reaches no pruned head's queries or keys
    (probs.square().sum() + out.logits.square().mean()).backward()
    q = model.model.layers[0].self_attn.q_proj.weight.grad
    assert q[:8].abs().max() == 0 and q[8:].abs().max() > 0
    assert model.model.layers[0].self_attn.k_proj.weight.grad[:8].abs().max() == 0
    assert model.model.layers[0].self_attn.v_proj.weight.grad[:8].abs().max() == 0

    names = {n: p for n, p in model.named_parameters()}
    grad = torch.zeros_like(names["model.layers.0.self_attn.q_proj.weight"])
    grad[:8] = 1  # only the pruned head's query rows are sensitive
    pruner.observe([("model.layers.0.self_attn.q_proj.weight", grad)])
    assert pruner.scores[("hidden",)].abs().max() == 0


def test_attention_losses_compare_only_the_kept_heads():
    from ds_distill.objectives.attention import AttentionMSELoss

    student = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    teacher = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    kept = torch.tensor([True, False, True, True])
    loss = AttentionMSELoss.compare(
        None, student, teacher, torch.ones(2, 1, 5, 5, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    )
    changed = teacher.clone()
    changed[:, 1] = torch.softmax(torch.randn(2, 5, 5), -1)
    weights = kept.float()[:, None, None]
    both = [AttentionMSELoss.compare(None, student * weights, t * weights, torch.ones(2, 1, 5, 5, dtype=torch.bool),
                                     torch.ones(2, 5, dtype=torch.bool)) for t in (teacher, changed)]  # fmt: skip
    assert both[0] == both[1] and loss != both[0]


def test_sensitivity_is_scored_only_on_steps_that_tighten_masks():
    pruner = prune.Pruner(build(EVERY_FAMILY["llama_gqa"]), PruneConfig(d_ff=40, steps=6, start_step=1, every_steps=2))
    assert [step for step in range(1, 12) if pruner.scoring(step)] == [2, 4, 6]


def test_homodistil_refuses_a_student_that_does_not_start_as_the_teacher():
    config = EVERY_FAMILY["bert"]
    with pytest.raises(ConfigError, match="starts as the teacher"):
        prune.check(PruneConfig(d_model=16), {"zero_optimization": {"stage": 2}}, config, config, False)
    with pytest.raises(ConfigError, match="starts as the teacher"):
        prune.check(PruneConfig(d_model=16), {"zero_optimization": {"stage": 2}}, config, shrunk(config, d_ff=32), True)
    prune.check(
        PruneConfig(d_model=16), {"zero_optimization": {"stage": 2}}, config, shrunk(config, encoder_layers=1), True
    )


def test_calibration_is_a_seeded_sample_across_the_split():
    rows = students.calibration_rows(1000, 8, 4, seed=1)
    flat = [i for batch in rows for i in batch]
    assert len(set(flat)) == 32 and max(flat) > 500  # not the first rows
    assert rows == students.calibration_rows(1000, 8, 4, seed=1) != students.calibration_rows(1000, 8, 4, seed=2)
    shares = [students.rank_share(rows, rank, 3) for rank in range(3)]
    assert [len(share) for share in shares] == [1, 1, 1]


def test_llama_family_head_cuts_hidden_only_cuts_and_qwen3_head_width():
    mha = EVERY_FAMILY["llama_mha"]
    plan = cut.make_plan(mha, shrunk(mha, num_heads=2, d_model=16), {"decoder": [0, 1]})  # crashed with a KeyError
    assert plan.attention[("self", "decoder", 0)].rows("k", 32) == list(range(16))
    qwen3 = EVERY_FAMILY["qwen3"]
    hidden_only = shrunk(qwen3, d_model=16)
    assert hidden_only.head_dim == 16 and hidden_only.num_attention_heads == 4
    model = build(qwen3)
    scores = activation_scores(model, batches(qwen3))  # q_norm/k_norm are not hidden-channel norms
    assert scores[("hidden",)].shape == (32,)
    pruner = prune.Pruner(model, PruneConfig(d_model=16, steps=1))
    model(input_ids=torch.randint(3, 96, (1, 4))).logits.sum().backward()
    pruner.observe((n, (p * p.grad).abs()) for n, p in model.named_parameters())


def test_target_params_proposes_only_shapes_a_cut_can_make():
    """SmolLM2-135M: 9 heads in 3 key/value groups of 64 channels."""
    smol = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        num_hidden_layers=30, tie_word_embeddings=True, head_dim=64,
    )  # fmt: skip
    for dims, _ in students.propose_dims(smol, students.parse_count("30M")):
        assert dims.num_heads % 3 == 0
        cut.check_cut(smol, shrunk(smol, **{k: v for k, v in vars(dims).items() if k in ("d_model", "num_heads")}))
    with pytest.raises(ConfigError, match="whole key/value groups.*multiple of 3, not 5"):
        cut.check_cut(smol, shrunk(smol, num_heads=5, d_model=320))


def test_a_shape_the_cut_cannot_make_is_refused_before_any_tensor_is_read(tmp_path):
    config = EVERY_FAMILY["llama_gqa"]
    config.save_pretrained(tmp_path / "teacher")  # a config and no weights: reading any tensor would fail
    with pytest.raises(ConfigError, match="whole key/value groups"):
        students.make_student(
            str(tmp_path / "teacher"), tmp_path / "out", FromTeacherConfig(num_heads=3, width="first")
        )


def test_a_t5_saved_from_a_v1_1_style_config_with_only_the_shared_embedding_can_be_cut(tiny, tmp_path):
    from transformers import AutoTokenizer

    config = transformers.T5Config(**SMALL, **T5_LIKE, tie_word_embeddings=False)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "teacher")  # stores shared.weight only
    AutoTokenizer.from_pretrained(tiny["t5"]).save_pretrained(tmp_path / "teacher")
    dims = FromTeacherConfig(d_model=16, num_heads=2, encoder_layers=1, decoder_layers=1, width="first")
    students.make_student(str(tmp_path / "teacher"), tmp_path / "student", dims)
    teacher = models.adapter_for(config).from_pretrained(str(tmp_path / "teacher"))
    student = models.adapter_for(config).from_pretrained(str(tmp_path / "student"))
    torch.testing.assert_close(student.lm_head.weight, teacher.lm_head.weight[:, :16])


def test_make_student_data_needs_only_a_data_section_and_tokenizes_only_the_sampled_rows(tiny, tmp_path):
    from ds_distill.surgery.students import calibration_batches
    from tests.conftest import translation_config, write_yaml

    data = translation_config(tiny, tmp_path / "unused")["data"]
    data.pop("max_train_samples", None)  # the whole 9,000-row split: only the 2 x 4 sampled rows are tokenized
    config = write_yaml(tmp_path / "data.yaml", {"data": data, "train": {"per_device_train_batch_size": 4}})
    teacher = models.adapter_for(models.load_config(str(tiny["t5"]), "t")).from_pretrained(str(tiny["t5"]))
    calibration = calibration_batches(str(config), str(tiny["t5"]), 2)
    drawn = calibration(teacher)
    assert [batch["input_ids"].shape[0] for batch in drawn] == [4, 4]
    with pytest.raises(ConfigError, match="no data: section"):
        calibration_batches(str(write_yaml(tmp_path / "none.yaml", {"train": {}})), str(tiny["t5"]), 2)
