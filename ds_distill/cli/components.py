"""`ds-distill list`: what ships with the package; `ds-distill keys`: every key a run config may hold."""

from __future__ import annotations

DIVERGENCE_NOTES = {
    "forward_kl": "KL(teacher || student), the default (Hinton et al. 2015)",
    "reverse_kl": "KL(student || teacher): mode-seeking (MiniLLM)",
    "jsd": "generalised JSD with beta, the teacher's weight in the mixture (GKD, Agarwal et al. 2024)",
    "skew_kl": "KL(teacher || alpha teacher + (1 - alpha) student) (DistiLLM)",
    "tvd": "total variation distance, half the L1 distance of the two distributions",
}


def list_components():
    """Lists shipped recipes, methods, loss terms, layer-map strategies, model families and DeepSpeed configs."""
    from ds_distill.config.deepspeed import PROJECT_ROOT
    from ds_distill.config.load import RECIPES_DIR
    from ds_distill.config.methods import METHODS
    from ds_distill.models import ADAPTERS
    from ds_distill.objectives.layer_map import describe_strategies
    from ds_distill.objectives.registry import describe_losses

    print(f"recipes (ds-distill distill --recipe=NAME; the files are in {RECIPES_DIR}):")
    for path in sorted(RECIPES_DIR.glob("[!_]*.yaml")):  # _*.yaml: bases that recipes share
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        print(f"  {path.stem:<24} {first}")
    print("methods (method: NAME at the top of a run config; presets of losses and layer maps):")
    for name, method in METHODS.items():
        print(f"  {name:<24} {method.summary}")
    print("losses (the YAML's losses: section):")
    for name, doc in describe_losses().items():
        print(f"  {name:<24} {first_sentence(doc).split(': ', 1)[-1]}")
    print("KD divergences (losses.kd.divergence; losses.kd.temperature T, the term scaled by T^2, TVD's by T):")
    for name, line in DIVERGENCE_NOTES.items():
        print(f"  {name:<24} {line}")
    print("layer-map strategies (layer_map.encoder / layer_map.decoder, or a loss's own layer_map):")
    for name, line in describe_strategies().items():
        print(f"  {name:<24} {line}")
    print("model families:")
    for adapter in ADAPTERS:
        print(f"  {adapter.name:<24} {adapter.kind}: {', '.join(adapter.model_types)}")
    print("DeepSpeed configs (ds_configs/):")
    for path in sorted((PROJECT_ROOT / "ds_configs").glob("*.json")):
        print(f"  {path.name}")


def keys(section: str | None = None):
    """Lists every run-config key with its type, default and what it does; SECTION narrows the list.

        ds-distill keys                        every key: the run config's, then each loss term's options
        ds-distill keys train                  one section: teacher, student, data, layer_map, losses, train, prune
        ds-distill keys losses.kd              or a deeper one (student.init.from_teacher, losses.cka.layer_map)

    A YAML nests the keys as the dots do; a flag overrides one: --train.learning_rate=3e-4.

    Args:
        section: a dotted prefix of the keys to list.
    """
    import difflib

    from ds_distill.config.keys import Key, described
    from ds_distill.config.keys import keys as config_keys
    from ds_distill.config.losses import OPTIONS
    from ds_distill.config.run import RunConfig
    from ds_distill.errors import ConfigError

    found = config_keys(RunConfig)
    found.append(
        Key(
            "students",
            "dict[str, dict] | None",
            "None",
            "Several students on one teacher pass: a name "
            "per student, each overriding the run's sections key by key (README, 'Several students').",
        )
    )
    for name, options in OPTIONS.items():
        found.append(Key(f"losses.{name}.weight", "float", "1.0", "The term's weight in the sum; 0 turns it off."))
        for key in config_keys(options, f"losses.{name}.", whole=("layer_map",)):
            if key.name.endswith(".layer_map"):  # listed once, under the run's layer_map
                key.doc += " Its keys are layer_map's (ds-distill keys layer_map)."
            found.append(key)
    if section:
        section = str(section)
        chosen = [key for key in found if key.name == section or key.name.startswith(section + ".")]
        if not chosen:
            prefixes = sorted({".".join(key.name.split(".")[:depth]) for key in found for depth in (1, 2, 3)})
            close = difflib.get_close_matches(section, prefixes, n=3)
            hint = (
                f"; did you mean {' or '.join(close)}?"
                if close
                else f"; sections: {', '.join(sorted({key.name.split('.')[0] for key in found}))}"
            )
            raise ConfigError(f"no run-config key starts with '{section}'{hint}")
        found = chosen
    print(described(found))


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, whole however many lines it spans."""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]
