"""Students cut from the teacher's weights: exact at the teacher's size, the chosen blocks, the ranked widths."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoTokenizer

from ds_distill import models
from ds_distill.config.run import FromTeacherConfig
from ds_distill.errors import ConfigError
from ds_distill.surgery import cut as slicing
from ds_distill.surgery import students
from ds_distill.surgery.importance import activation_scores

FAMILIES = {
    "t5": transformers.T5Config(
        vocab_size=96, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=3, num_decoder_layers=3,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, dropout_rate=0.0,
    ),
    "bart": transformers.BartConfig(
        vocab_size=96, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_layers=3, decoder_layers=3, max_position_embeddings=32,
    ),
    "gpt2": transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=32),
    "llama": transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=3,
    ),
    "bert": transformers.BertConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
        max_position_embeddings=32,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def teachers(tiny, tmp_path_factory):
    """Tiny random teachers of each family, saved as a user's checkpoints are."""
    root = tmp_path_factory.mktemp("teachers")
    paths = {}
    for name, config in FAMILIES.items():
        torch.manual_seed(0)
        paths[name] = root / name
        models.adapter_for(config).from_config(config).save_pretrained(paths[name])
        AutoTokenizer.from_pretrained(tiny["t5"]).save_pretrained(paths[name])
    return paths


def logits(model, ids):
    inputs = {"input_ids": ids}
    if models.adapter_for(model.config).kind == "seq2seq":
        inputs["decoder_input_ids"] = ids
    with torch.no_grad():
        return model.eval()(**inputs).logits


def cut(teacher_path, tmp_path, dims: FromTeacherConfig, calibration=None):
    _, plan = students.make_student(str(teacher_path), tmp_path / "student", dims, calibration)
    return models.adapter_for(models.load_config(str(tmp_path / "student"), "s")).from_pretrained(
        str(tmp_path / "student")
    ), plan


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_student_of_the_teachers_own_size_is_the_teacher(teachers, tmp_path, family):
    student, _ = cut(teachers[family], tmp_path, FromTeacherConfig(strategy="sliced", width="first"))
    teacher = models.adapter_for(FAMILIES[family]).from_pretrained(str(teachers[family]))
    ids = torch.randint(3, 96, (2, 7))
    assert torch.equal(logits(student, ids), logits(teacher, ids))


@pytest.mark.parametrize("family", ["t5", "llama", "gpt2"])
def test_fewer_blocks_equal_a_model_built_by_hand_from_the_chosen_blocks(teachers, tmp_path, family):
    config = FAMILIES[family]
    adapter = models.adapter_for(config)
    depth = {stack: 2 for stack in adapter.depths(config)}
    dims = FromTeacherConfig(
        **{f"{stack}_layers": n for stack, n in depth.items()}, layers="first", strategy="sliced", width="first"
    )
    dims.encoder_layers_from = [0, 2] if "encoder" in depth else None
    dims.decoder_layers_from = [1, 2]
    student, _ = cut(teachers[family], tmp_path, dims)

    teacher = adapter.from_pretrained(str(teachers[family]))
    by_hand = adapter.from_config(adapter.shrink(config, dims)).eval()
    chosen = {stack: blocks for stack, blocks in {"encoder": [0, 2], "decoder": [1, 2]}.items() if stack in depth}
    state = {}
    for name, tensor in teacher.state_dict().items():
        for stack, blocks in chosen.items():
            prefix = f"{adapter.layout[stack].blocks}."
            at = name.find(prefix)
            if at >= 0 and (at == 0 or name[at - 1] == "."):
                block = int(name[at + len(prefix) :].split(".")[0])
                if block in blocks:
                    renamed = name.replace(f"{prefix}{block}.", f"{prefix}{blocks.index(block)}.", 1)
                    state[renamed] = tensor
                if block == 0 and name.endswith("relative_attention_bias.weight"):
                    state[name] = tensor  # T5: the bias of block 0 serves every block
                break
        else:
            state[name] = tensor
    by_hand.load_state_dict(state, strict=True)
    ids = torch.randint(3, 96, (2, 7))
    torch.testing.assert_close(logits(student, ids), logits(by_hand, ids), rtol=0, atol=0)


def test_layer_choices():
    assert slicing.choose_layers("alternate", 24, 12) == list(range(1, 24, 2))
    assert slicing.choose_layers("uniform", 24, 12) == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]
    assert slicing.choose_layers("first", 6, 2) == [0, 1] and slicing.choose_layers("last", 6, 2) == [4, 5]
    with pytest.raises(ConfigError, match="a student of 8 blocks cannot be cut from a teacher of 6"):
        slicing.choose_layers("first", 6, 8)


def test_importance_keeps_what_the_activations_rank_highest(teachers, tmp_path):
    """A planted dead head group, dead FFN neurons and a dead hidden channel are what a narrower student drops."""
    config = FAMILIES["llama"]
    adapter = models.adapter_for(config)
    teacher = adapter.from_pretrained(str(teachers["llama"]))
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.v_proj.weight[:8] = 0  # key/value group 0 (query heads 0, 1) outputs nothing
            layer.mlp.up_proj.weight[:16] = 0  # neurons 0-15 never fire
        for module in teacher.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight[5] = 0  # hidden channel 5 is zero after every norm
    planted = tmp_path / "planted"
    teacher.save_pretrained(planted)
    AutoTokenizer.from_pretrained(teachers["llama"]).save_pretrained(planted)

    batches = [{"input_ids": torch.randint(3, 96, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)}]
    scores = activation_scores(teacher, batches)
    for block in range(3):  # per block: units are key/value groups
        assert scores[("heads", "self", "decoder", block)][0] < scores[("heads", "self", "decoder", block)][1]
    assert scores[("ffn", "decoder", 0)][:16].max() < scores[("ffn", "decoder", 0)][16:].min()
    assert int(scores[("hidden",)].argmin()) == 5

    dims = FromTeacherConfig(d_model=16, d_ff=48, num_heads=2, width="importance", strategy="sliced")
    _, plan = students.make_student(str(planted), tmp_path / "student", dims, lambda model: batches)
    assert plan.attention[("self", "decoder", 0)].units == [1] and plan.attention[("self", "decoder", 0)].heads == [
        2,
        3,
    ]
    assert plan.ffn[("decoder", 0)] == list(range(16, 64))
    assert 5 not in plan.hidden and len(plan.hidden) == 16
    student = models.adapter_for(models.load_config(str(tmp_path / "student"), "s")).from_pretrained(
        str(tmp_path / "student")
    )
    kept = student.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(kept, teacher.model.layers[0].self_attn.q_proj.weight[16:][:, plan.hidden])


def test_heads_stay_whole_where_rotary_embeddings_pair_their_channels():
    """A Llama-family cut keeps the head width: a narrower d_model with the heads kept is a hidden-only cut."""
    config = FAMILIES["llama"]
    student = models.adapter_for(config).shrink(config, FromTeacherConfig(d_model=24, num_heads=4))
    assert student.head_dim == 8 and student.num_key_value_heads == 2
    with pytest.raises(ConfigError, match="whole key/value groups.*multiple of 2, not 3"):
        slicing.make_plan(
            config, models.adapter_for(config).shrink(config, FromTeacherConfig(num_heads=3)), {"decoder": [0, 1, 2]}
        )


def test_narrower_heads_keep_the_ranked_channels_of_each_head(teachers, tmp_path):
    """HomoBERT's widths (240 of 768) are not whole heads: each head keeps the same number of its channels."""
    adapter = models.adapter_for(FAMILIES["bert"])
    teacher = adapter.from_pretrained(str(teachers["bert"]))
    with torch.no_grad():
        for layer in teacher.bert.encoder.layer:
            for head in range(4):
                layer.attention.self.value.weight[head * 8 + 7] = 0  # channel 7 of every head carries nothing
                layer.attention.self.value.bias[head * 8 + 7] = 0
    planted = tmp_path / "planted"
    teacher.save_pretrained(planted)
    AutoTokenizer.from_pretrained(teachers["bert"]).save_pretrained(planted)
    batches = [{"input_ids": torch.randint(3, 96, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)}]
    dims = FromTeacherConfig(d_model=28, num_heads=4, width="importance", strategy="sliced")
    student, plan = cut(planted, tmp_path, dims, lambda model: batches)
    attention = plan.attention[("self", "encoder", 0)]
    assert attention.heads == [0, 1, 2, 3]
    assert all(7 not in channels for channels in attention.vo.values())
    rows, key_rows = attention.rows("q", 32), attention.rows("k", 32)
    student_attention, teacher_attention = (
        student.bert.encoder.layer[0].attention,
        teacher.bert.encoder.layer[0].attention,
    )
    torch.testing.assert_close(  # queries carry sqrt(7 / 8): scores keep the scale 1 / sqrt(8) of the full heads
        student_attention.self.query.weight, teacher_attention.self.query.weight[rows][:, plan.hidden] * (7 / 8) ** 0.5
    )
    torch.testing.assert_close(
        student_attention.self.key.weight, teacher_attention.self.key.weight[key_rows][:, plan.hidden]
    )
    assert student.config.hidden_size == 28 and logits(student, torch.randint(3, 96, (1, 5))).shape == (1, 5, 96)


def test_target_params_proposes_dimensions_near_the_size():
    teacher = models.load_config("google/flan-t5-xl", "teacher")
    proposals = students.propose_dims(teacher, students.parse_count("145M"))
    assert abs(proposals[0][1] - 145e6) / 145e6 < 0.03
    assert students.parse_count("1.2B") == 1_200_000_000


def test_make_student_verb_cuts_ranks_reports_and_protects_the_output(tiny, tmp_path):
    from tests.conftest import run_verb, translation_config, write_yaml

    run = write_yaml(tmp_path / "run.yaml", translation_config(tiny, tmp_path / "run"))
    out = tmp_path / "student"
    args = [f"--teacher={tiny['t5']}", f"--output_dir={out}", "--encoder_layers=1", "--decoder_layers=1"]
    args += ["--d_model=32", "--d_ff=64", "--num_heads=2", "--width=importance", f"--data={run}"]
    result = run_verb("make_student", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encoder blocks from teacher blocks [0]" in result.stdout and "M parameters" in result.stdout
    counted = run_verb("count_params", str(out))
    assert counted.returncode == 0 and "M parameters" in counted.stdout
    assert run_verb("make_student", *args).returncode == 0  # an earlier make_student output is replaced

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = run_verb("make_student", f"--teacher={tiny['t5']}", f"--output_dir={foreign}")
    assert refused.returncode == 2 and "is not empty and is not an earlier make_student output" in refused.stderr


def test_cut_dimensions_are_checked_against_the_teachers_own_widths():
    """Below 1, or above what the teacher has, a cut dimension is refused; GPT-2's `n_inner: None` (4 x its
    width, as the hub's gpt2 ships it) is no width to compare with."""
    teacher = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=None)
    adapter = models.adapter_for(teacher)
    student = adapter.shrink(teacher, FromTeacherConfig(d_model=32, num_heads=2, d_ff=64, strategy="sliced"))
    assert (student.n_embd, student.n_inner) == (32, 64)
    for dims, message in ((dict(d_model=0), "d_model must be at least 1, got 0"),
                          (dict(decoder_layers=3), "decoder_layers 3 is more than the teacher's 2")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            adapter.shrink(teacher, FromTeacherConfig(**dims, strategy="sliced"))
