"""Every loss term's options, as the YAML's `losses:` section writes them; typed when the config loads.

    losses:
      ce: {weight: 1.0}
      kd: {weight: 1.0, divergence: jsd, beta: 0.5, temperature: 2.0}
      cka: {weight: 1.0, layer_map: {decoder: uniform}}

`RunConfig.losses` maps each term's name to its `LossTerm` (weight and options); `ds-distill keys losses` lists
every option. The terms themselves, which read these options, are built by objectives/registry.py; checks that
need the models (a layer map the depths do not fit) are made there, before any weights load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ds_distill.config.typed import coerce, from_dict, unknown_key_error
from ds_distill.errors import ConfigError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
CROSS_TOKENIZER_KINDS = ("uld", "hybrid")
NORMALIZATIONS = ("auto", "none", "rms", "layer", "channel")
CKA_DTYPES = ("bfloat16", "float32", "float64")
ASPECTS = ("attention", "hidden", "attention_output", "ffn_output")
"""MaKD's aspects (objectives/makd.py)."""


@dataclass
class LayerMapConfig:
    """Which student layer learns from which teacher layer, per stack. Layer 0 is the embeddings' output,
    layer i the output of block i. A strategy name (`uniform`, `last`; `ds-distill list`) or explicit pairs
    `[[student, teacher], ...]` (also `"1:2,2:4"` on the command line); many-to-one is allowed."""

    encoder: Any = "uniform"
    decoder: Any = "uniform"
    include_embeddings: bool = True
    """Also pair the embeddings (layer 0 with layer 0)."""


def check_normalization(value: str | bool) -> str:
    """A `normalize` option as one of `NORMALIZATIONS`; true / false (the option's first, boolean form) read as
    layer / none."""
    value = {"true": "layer", "false": "none"}.get(str(value).strip().lower(), str(value))
    if value not in NORMALIZATIONS:
        raise ConfigError(f"normalize '{value}' is unknown; choose one of {', '.join(NORMALIZATIONS)}")
    return value


@dataclass
class NoOptions:
    pass


@dataclass
class LayerwiseOptions:
    layer_map: LayerMapConfig | None = None
    """This term's own map; default: the term's documented default, else the run's `layer_map`."""
    reduction: str = "sum"
    """sum | mean over layer pairs."""

    def __post_init__(self):
        if self.reduction not in ("sum", "mean"):
            raise ConfigError(f"reduction '{self.reduction}' is unknown; choose sum or mean")


@dataclass
class RelationOptions(LayerwiseOptions):
    layer_map: LayerMapConfig | None = None
    """Default: last student layer <- last teacher layer in each stack."""
    relation_heads: int = 8
    """R: the projected width of each model is split into R slices (must divide both)."""

    def __post_init__(self):
        super().__post_init__()
        if self.relation_heads < 1:
            raise ConfigError("relation_heads must be at least 1")


@dataclass
class MiniEnDOptions(RelationOptions):
    encoder_self: bool = False
    """MiniEnD-E: also the encoder's self-attention relations (MiniEnD-D without)."""
    cross_query_key: bool = False
    """Also the decoder-query / encoder-key relation of cross-attention."""


@dataclass
class AttentionOptions(LayerwiseOptions):
    average_heads: bool = False
    """Compare head-averaged distributions even when the head counts match (they are averaged when they differ)."""


@dataclass
class MaKDOptions(AttentionOptions):
    rank: int = 64
    aspect_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ASPECTS, 1.0))
    """Weight per aspect: attention, hidden, attention_output, ffn_output."""
    stages: list[dict] = field(default_factory=list)
    """[{steps: N, aspects: [...]}, ...]: which aspects count in each stage; empty: all, always."""
    normalize: str = "auto"
    """auto | none | rms | layer | channel for the MSE aspects (hidden, attention_output, ffn_output), as in
    hidden_mse: auto is rms where a model is pre-LN, none where both are post-LN."""

    def __post_init__(self):
        super().__post_init__()
        self.normalize = check_normalization(self.normalize)
        unknown = set(self.aspect_weights) - set(ASPECTS)
        if unknown:
            raise ConfigError(
                f"losses.makd.aspect_weights: unknown aspects {sorted(unknown)}; use {', '.join(ASPECTS)}"
            )
        self.aspect_weights = {**dict.fromkeys(ASPECTS, 1.0), **{k: float(v) for k, v in self.aspect_weights.items()}}
        for stage in self.stages:
            if not isinstance(stage, dict) or set(stage) != {"steps", "aspects"} or int(stage["steps"]) < 1:
                raise ConfigError(f"losses.makd.stages: each stage is {{steps: N >= 1, aspects: [...]}}, got {stage!r}")
            if set(stage["aspects"]) - set(ASPECTS):
                raise ConfigError(f"losses.makd.stages: aspects are {', '.join(ASPECTS)}; got {stage['aspects']}")
        if self.rank < 1:
            raise ConfigError("losses.makd.rank must be at least 1")


@dataclass
class CKAOptions(LayerwiseOptions):
    squared: bool = False
    """1 - CKA instead of 1 - sqrt(CKA)."""
    dtype: str = "float32"
    """float32 | float64 | bfloat16: precision of the d x d products. bfloat16 (rows still centred and scaled in
    float32; GPUs accumulate its products in float32) ran within 3.5e-4 of float64 on SmolLM2's states, with a
    0.3-1.8% gradient error (bench/RESULTS.md, "CKA precision"): the fast choice on GPUs, slow on most CPUs."""
    normalize: str = "auto"
    """auto | none | rms | layer | channel: what is compared (see `cka_loss`). auto is rms where the teacher or the
    student is pre-LN, none where both are post-LN: on SmolLM2 (13 pairs) CKA helped only on RMS-normalised
    states, and on a pre-LN T5 it did no worse (bench/RESULTS.md, "What makes CKA help")."""
    skip_first: bool = False
    """Leave each sequence's first position out (in pre-LN models it carries massive activations)."""

    def __post_init__(self):
        super().__post_init__()
        self.normalize = check_normalization(self.normalize)
        if self.dtype not in CKA_DTYPES:
            raise ConfigError(f"cka dtype '{self.dtype}' is unknown; choose one of {', '.join(CKA_DTYPES)}")


@dataclass
class ProjectedOptions(LayerwiseOptions):
    projection: str = "none"
    """none (equal widths) | linear (A h + b) | low_rank (d_S -> rank -> d_T)."""
    rank: int = 64
    per_pair: bool = False
    """One projection per layer pair instead of one shared by all pairs."""
    normalize: str = "auto"
    """auto | none | rms | layer | channel: how both sides are normalised (the student after its projection)
    before they are compared. auto is rms where the teacher or the student is pre-LN (T5, Llama, Qwen, Mistral,
    GPT-2, mBART), whose block outputs are raw residual sums in the hundreds to thousands (raw MSE swamps CE
    and KD), and none for post-LN BERT, RoBERTa and BART. true / false read as layer / none."""

    def __post_init__(self):
        super().__post_init__()
        self.normalize = check_normalization(self.normalize)


@dataclass
class LinearOptions(ProjectedOptions):
    projection: str = "linear"


@dataclass
class OnPolicyOptions:
    """On-policy KD (GKD, Agarwal et al. 2024; train/on_policy.py): on `fraction` of the micro-batches the targets
    are the student's own samples."""

    fraction: float = 0.5
    temperature: float = 1.0
    """The student's sampling temperature (the divergence keeps losses.kd.temperature)."""
    max_new_tokens: int = 64
    prompt_tokens: int = 64
    """Decoder-only (packed text): each block's first tokens that the student continues."""

    def __post_init__(self):
        if not 0 <= self.fraction <= 1:
            raise ConfigError("losses.kd.on_policy.fraction must lie between 0 and 1")
        if self.temperature <= 0:
            raise ConfigError("losses.kd.on_policy.temperature must be positive")
        for name in ("max_new_tokens", "prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"losses.kd.on_policy.{name} must be at least 1")


@dataclass
class KDOptions:
    divergence: str = "forward_kl"
    """forward_kl | reverse_kl | jsd | skew_kl | tvd"""
    temperature: float = 1.0
    beta: float = 0.5
    """jsd: weight of the teacher in the mixture (0 < beta < 1)."""
    alpha: float = 0.1
    """skew_kl: weight of the teacher in the skewed student distribution (0 < alpha < 1)."""
    on_policy: OnPolicyOptions | None = None
    """{fraction, temperature, max_new_tokens, prompt_tokens}: also on the student's own samples."""
    cross_tokenizer: str | None = None
    """uld | hybrid: compare the two models over groups of tokens that cover the same text, as needed where the
    teacher's tokenizer is not the student's (objectives/cross_tokenizer.py); with one tokenizer, `hybrid` equals
    the same-tokenizer term."""
    hybrid_matched_weight: float | None = None
    """hybrid: the weight of the divergence over the tokens both vocabularies hold (the other tokens' sorted L1
    takes 1 minus it). None: the matched share of the teacher's vocabulary, as GOLD (an 8k student of a 49k
    teacher: 0.15, however much of the probability the matched tokens carry)."""

    def __post_init__(self):
        if self.cross_tokenizer is not None and self.cross_tokenizer not in CROSS_TOKENIZER_KINDS:
            raise ConfigError(
                f"losses.kd.cross_tokenizer '{self.cross_tokenizer}' is unknown; choose one of "
                f"{', '.join(CROSS_TOKENIZER_KINDS)}"
            )
        if self.hybrid_matched_weight is not None and self.cross_tokenizer != "hybrid":
            raise ConfigError("losses.kd.hybrid_matched_weight weights the hybrid term; set "
                              "losses.kd.cross_tokenizer: hybrid or remove it")  # fmt: skip
        if self.hybrid_matched_weight is not None and not 0 <= self.hybrid_matched_weight <= 1:
            raise ConfigError("losses.kd.hybrid_matched_weight must lie between 0 and 1")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(
                f"losses.kd.divergence '{self.divergence}' is unknown; choose one of {', '.join(DIVERGENCES)}"
            )
        if self.temperature <= 0:
            raise ConfigError("losses.kd.temperature must be positive")
        for name in ("beta", "alpha"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"losses.kd.{name} must lie strictly between 0 and 1")


OPTIONS: dict[str, type] = {
    "ce": NoOptions,
    "kd": KDOptions,
    "cka": CKAOptions,
    "linear": LinearOptions,
    "hidden_mse": ProjectedOptions,
    "hidden_cosine": ProjectedOptions,
    "embedding_mse": ProjectedOptions,
    "relation": RelationOptions,
    "miniend": MiniEnDOptions,
    "attention_kl": AttentionOptions,
    "attention_mse": AttentionOptions,
    "makd": MaKDOptions,
}
"""Each loss term's options, by the name the YAML gives the term (the terms: objectives/registry.py)."""


@dataclass
class LossTerm:
    """One configured term: its weight in the total (0 leaves it out) and its options."""

    weight: float = 1.0
    options: Any = field(default_factory=NoOptions)


def parse_losses(tree: dict[str, Any], where: str = "losses") -> dict[str, LossTerm]:
    """`losses:` as the YAML writes it ({name: {weight, **options}}) as typed terms; unknown names and options,
    and values out of range, are errors here. Terms already typed pass unchanged."""

    if not isinstance(tree, dict):
        raise ConfigError(f"{where} must map term names to their options, e.g. {{ce: {{weight: 1.0}}}}")
    terms = {}
    for name, spec in tree.items():
        if isinstance(spec, LossTerm):
            terms[name] = spec
            continue
        if name not in OPTIONS:
            raise unknown_key_error(name, sorted(OPTIONS), f"{where}.")
        if not isinstance(spec, dict | type(None)):
            raise ConfigError(f"{where}.{name} must be a mapping such as {{weight: 1.0}}, got {spec!r}")
        spec = dict(spec or {})
        weight = coerce(spec.pop("weight", 1.0), float, f"{where}.{name}.weight")
        terms[name] = LossTerm(weight, from_dict(OPTIONS[name], spec, f"{where}.{name}"))
    return terms


def losses_tree(terms: dict[str, LossTerm]) -> dict[str, dict[str, Any]]:
    """The terms as the YAML writes them, every option spelled out (a run's resolved config.yaml)."""
    return {name: {"weight": term.weight, **dataclasses.asdict(term.options)} for name, term in terms.items()}
