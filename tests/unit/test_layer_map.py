"""Layer maps (strategies, explicit pairs, errors) and method presets."""

from __future__ import annotations

import pytest

from ds_distill.config.load import load_config
from ds_distill.config.losses import CKAOptions, LayerMapConfig, LossTerm, RelationOptions
from ds_distill.config.run import to_yaml
from ds_distill.errors import ConfigError
from ds_distill.objectives.layer_map import resolve, resolve_stack, uniform


def test_uniform_maps_half_depth_to_every_second_layer():
    assert uniform(12, 24) == [(i, 2 * i) for i in range(1, 13)]
    assert uniform(6, 24) == [(i, 4 * i) for i in range(1, 7)]
    assert uniform(2, 3) == [(1, 2), (2, 3)]  # 1.5 rounds half up
    assert uniform(4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]


def test_strategies_embeddings_and_explicit_pairs():
    assert resolve_stack("last", True, 6, 24, "m") == [(0, 0), (6, 24)]
    assert resolve_stack("last", False, 6, 24, "m") == [(6, 24)]
    many_to_one = [(1, 4), (2, 4), (3, 8)]
    for spec in ("1:4,2:4,3:8", ("1:4", "2:4", "3:8"), [[1, 4], [2, 4], [3, 8]]):
        assert resolve_stack(spec, False, 3, 8, "m") == many_to_one
    assert resolve_stack([[0, 1], [2, 8]], True, 3, 8, "m") == [(0, 1), (2, 8)]  # an explicit layer-0 pair is kept


def test_stacks_resolve_apart():
    pairs = resolve(
        LayerMapConfig(encoder="last", decoder="uniform", include_embeddings=False),
        {"encoder": (2, 4), "decoder": (2, 6)},
    )
    assert [str(p) for p in pairs] == ["encoder 2->4", "decoder 1->3", "decoder 2->6"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("7:14", "layer_map.encoder maps student layer 7 but the student has 6 layers"),
        ([[1, 25]], "maps teacher layer 25 but the teacher has 24 layers"),
        ("middle", "'middle' is unknown; choose one of uniform, last"),
        ("1-2", "'1-2' is unknown"),
        ([[1, 2, 3]], "cannot read"),
        ([], "is empty"),
    ],
)
def test_bad_maps_say_what_is_wrong(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_stack(spec, True, 6, 24, "layer_map.encoder")


BASE = {
    "teacher": {"model_name_or_path": "t"},
    "student": {"model_name_or_path": "s"},
    "data": {"dataset": "json", "source_lang": "en", "target_lang": "de"},
}


def load(tmp_path, tree: dict, **overrides):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, **tree}))
    return load_config(str(path), overrides=overrides)


def test_method_presets_expand_and_the_config_wins(tmp_path):
    run = load(tmp_path, {"method": "cka"})
    assert set(run.losses) == {"ce", "kd", "cka"}
    assert run.layer_map == LayerMapConfig("uniform", "uniform", True)
    run = load(tmp_path, {"method": "cka", "losses": {"cka": {"squared": True}, "kd": {"weight": 0}}})
    assert run.losses["cka"] == LossTerm(1.0, CKAOptions(squared=True))
    assert run.losses["kd"].weight == 0  # turned off when the losses are built
    run = load(tmp_path, {"method": "minilmv2"}, **{"losses.relation.relation_heads": 12, "layer_map.decoder": "last"})
    assert run.losses["relation"] == LossTerm(1.0, RelationOptions(relation_heads=12))
    assert run.layer_map.decoder == "last"
    assert load(tmp_path, {"method": "miniend_e"}).losses["miniend"].options.encoder_self is True
    assert set(load(tmp_path, {"method": "tinybert"}).losses) == {"kd", "embedding_mse", "hidden_mse", "attention_mse"}


def test_saved_config_is_the_expansion(tmp_path):
    run = load(tmp_path, {"method": "makd"})
    text = to_yaml(run)
    assert text.startswith("# expanded from method: makd\n") and "method:" not in text.splitlines()[1:]
    (tmp_path / "saved.yaml").write_text(text)
    assert load_config(str(tmp_path / "saved.yaml")).losses == run.losses


def test_unknown_method_lists_the_presets(tmp_path):
    with pytest.raises(ConfigError, match="method 'tinybart' is unknown; choose one of kd, cka, linear, minilmv2"):
        load(tmp_path, {"method": "tinybart"})
