"""`ds-distill list`: what ships with the package."""

from __future__ import annotations


def list_components():
    """Lists shipped recipes, methods, loss terms, layer-map strategies, model families and DeepSpeed configs."""
    from ds_distill.config.deepspeed import PROJECT_ROOT
    from ds_distill.config.load import RECIPES_DIR
    from ds_distill.models import ADAPTERS
    from ds_distill.objectives.layer_map import describe_strategies
    from ds_distill.objectives.methods import METHODS
    from ds_distill.objectives.registry import describe_losses

    print("recipes (ds-distill distill --recipe=NAME):")
    for path in sorted(RECIPES_DIR.glob("[!_]*.yaml")):  # _*.yaml: bases that recipes share
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        print(f"  {path.stem:<24} {first}")
    print("methods (method: NAME at the top of a run config; presets of losses and layer maps):")
    for name, method in METHODS.items():
        print(f"  {name:<24} {method.summary}")
    print("losses (the YAML's losses: section):")
    for name, line in describe_losses().items():
        print(f"  {name:<24} {line.split(': ', 1)[-1]}")
    print("layer-map strategies (layer_map.encoder / layer_map.decoder, or a loss's own layer_map):")
    for name, line in describe_strategies().items():
        print(f"  {name:<24} {line}")
    print("model families:")
    for adapter in ADAPTERS:
        print(f"  {adapter.name:<24} {adapter.kind}: {', '.join(adapter.model_types)}")
    print("DeepSpeed configs (ds_configs/):")
    for path in sorted((PROJECT_ROOT / "ds_configs").glob("*.json")):
        print(f"  {path.name}")
