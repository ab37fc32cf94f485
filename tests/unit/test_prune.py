"""HomoDistil's pruning: the schedule, sensitivity scores, and a masked model that its dense cut reproduces."""

from __future__ import annotations

import pytest
import torch

from ds_distill import models
from ds_distill.config.run import PruneConfig
from ds_distill.surgery import prune
from ds_distill.surgery.cut import cut_state
from tests.unit.test_slicing import FAMILIES, logits

TARGETS = {  # narrower heads where the family allows them (BART, GPT-2, BERT), whole heads elsewhere
    "t5": PruneConfig(d_model=24, d_ff=40, num_heads=2, steps=10),
    "bart": PruneConfig(d_model=24, d_ff=40, num_heads=4, steps=10),
    "gpt2": PruneConfig(d_model=24, d_ff=40, num_heads=4, steps=10),
    "llama": PruneConfig(d_model=16, d_ff=40, num_heads=2, steps=10),
    "bert": PruneConfig(d_model=24, d_ff=40, num_heads=4, steps=10),
}


def test_the_cubic_schedule_runs_from_the_full_width_to_the_target_at_prune_steps():
    config = PruneConfig(steps=10, start_step=2)
    counts = [prune.kept_count(step, 64, 16, config) for step in range(14)]
    assert counts[:3] == [64, 64, 64] and counts[10:] == [16, 16, 16, 16]
    assert all(a >= b for a, b in zip(counts, counts[1:]))  # never loosens
    assert counts[6] == 16 + 48 * (1 - 4 / 8) ** 3  # cubic: the first steps prune most


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_dense_cut_computes_what_the_masked_model_computes(family):
    config = FAMILIES[family]
    adapter = models.adapter_for(config)
    torch.manual_seed(0)
    model = adapter.from_config(config).eval()
    pruner = prune.Pruner(model, TARGETS[family])
    generator = torch.Generator().manual_seed(1)
    for score in pruner.scores.values():  # any ranking: what matters is that masked and cut agree
        score.copy_(torch.rand(score.shape, generator=generator, dtype=torch.float64))
    pruner.update(TARGETS[family].steps)
    target = prune.target_config(config, TARGETS[family])
    assert {key: int(mask.sum()) for key, mask in pruner.masks.items()} == {
        key: kept for key, (_, kept) in pruner.sizes.items()
    }
    state = cut_state(model.state_dict(), config, target, pruner.plan())
    dense = adapter.from_config(target).eval()
    dense.load_state_dict(state)
    ids = torch.randint(3, 96, (2, 7), generator=generator)
    torch.testing.assert_close(logits(dense, ids), logits(model, ids), rtol=1e-4, atol=1e-5)


def test_sensitivity_ranks_a_unit_that_never_matters_last():
    config = FAMILIES["llama"]
    torch.manual_seed(0)
    model = models.adapter_for(config).from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 3] = 0  # neuron 3 writes nothing
            layer.mlp.up_proj.weight[3] = 0
            layer.mlp.gate_proj.weight[3] = 0
    pruner = prune.Pruner(model, PruneConfig(d_ff=40, steps=4, score_beta=0.5))
    ids = torch.randint(3, 96, (4, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    pruner.observe((name, (p * p.grad).abs()) for name, p in model.named_parameters())
    scores = pruner.scores[("ffn", "decoder", 0)]
    assert scores[3] == 0 and (scores[torch.arange(64) != 3] > 0).all()
    assert pruner.scores[("hidden",)].min() > 0
    pruner.update(4)
    assert not pruner.masks[("ffn", "decoder", 0)][3]


def test_scores_keep_no_autograd_history_from_step_to_step():
    """DeepSpeed's fp32 master weights require grad, so |w x grad| built from them carries a graph; a moving
    average over such scores chained every step's graph, and a gradient copy with it, to the next."""
    from types import SimpleNamespace

    config = FAMILIES["llama"]
    torch.manual_seed(0)
    model = models.adapter_for(config).from_config(config)
    pruner = prune.Pruner(model, PruneConfig(d_ff=40, steps=4))
    ids = torch.randint(3, 96, (2, 9))
    for _ in range(2):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        pruner.observe((name, (p * p.grad).abs()) for name, p in model.named_parameters())
    assert not any(score.requires_grad for score in pruner.scores.values())

    weight = torch.nn.Parameter(torch.zeros(4, 3))
    master = torch.randn(12, requires_grad=True)  # the rank's fp32 partition, as DeepSpeed keeps it
    weight._index_in_param_group = 0
    weight._hp_mapping = SimpleNamespace(
        lp_fragment_address=SimpleNamespace(start=2, numel=6),
        get_lp_grad_fragment=lambda index: torch.full((6,), -2.0),
        get_hp_fragment=lambda: master[2:8],
    )
    sensitivity = prune.local_sensitivity(weight).flatten()
    assert not sensitivity.requires_grad
    torch.testing.assert_close(sensitivity[2:8], 2 * master[2:8].detach().abs())
    assert sensitivity[:2].eq(0).all() and sensitivity[8:].eq(0).all()


def test_masks_and_scores_round_trip_as_tensors():
    import io

    config = FAMILIES["t5"]
    model = models.adapter_for(config).from_config(config)
    pruner = prune.Pruner(model, TARGETS["t5"])
    for score in pruner.scores.values():
        score.uniform_()
    pruner.update(5)
    buffer = io.BytesIO()
    torch.save(pruner.state_dict(), buffer)
    buffer.seek(0)
    again = prune.Pruner(models.adapter_for(config).from_config(config), TARGETS["t5"])
    again.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(again.masks[key], pruner.masks[key]) for key in pruner.masks)
    assert prune.plan_from_masks(config, pruner.state_dict()) == pruner.plan()
