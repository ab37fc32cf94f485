"""Model adapters: what differs between architecture families, kept in one place per family.

An adapter knows which Hugging Face head class a checkpoint needs, which tasks it can train on, how to
name depth and width in its config, and where its blocks, attention projections and feed-forward modules
are (`layouts.py`; `ds-distill list` shows the families). Code elsewhere asks the adapter instead of
testing `model_type`.

Add a family by subclassing `ModelAdapter` and listing its `model_types` in `ADAPTERS`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig

from ds_distill import dist
from ds_distill.config.run import FromTeacherConfig
from ds_distill.errors import ConfigError
from ds_distill.models.fused import use_fused_kernels
from ds_distill.models.hub import checkpoint_keys
from ds_distill.models.layouts import BART_STACKS, BERT_STACKS, GPT2_STACKS, LLAMA_STACKS, T5_STACKS, Site, StackLayout
from ds_distill.models.spaces import BART_WIDTHS, BERT_WIDTHS, GPT2_WIDTHS, LLAMA_WIDTHS, T5_WIDTHS, WidthLayout
from ds_distill.models.t5 import T5WithSeparateHead

DIMENSIONS = ("encoder_layers", "decoder_layers", "d_model", "d_ff", "num_heads")


@dataclass(frozen=True)
class ModelAdapter:
    """One architecture family.

    `config_fields` maps each generic student dimension (`FromTeacherConfig`) to the config attributes that
    hold it in this family; a dimension the family lacks (decoder layers of BERT) is absent.
    """

    name: str
    model_types: tuple[str, ...]
    kind: str  # "seq2seq" | "causal" | "encoder"
    config_fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    layout: dict[str, StackLayout] = field(default_factory=dict)
    widths: WidthLayout = field(default_factory=lambda: WidthLayout(axes=()))
    """How its tensors are cut for a narrower student (`models/spaces.py`)."""
    narrow_heads: bool = False
    """Whether a student's heads may be narrower than the teacher's (a head keeps some of its channels): where
    the head width is d_model / num_heads and no rotary embedding pairs channels (BERT, BART, GPT-2)."""
    optional_parts: tuple[str, ...] = ()
    """Prefixes of tensors of parts distillation never reads (BERT's pooler and next-sentence head): a checkpoint
    may lack them or hold them for a class without them, with a note, where other such tensors are errors."""
    logits_bias: str | None = None
    """A buffer the model's forward adds to the LM head's output (BART's `final_logits_bias`): the folded head
    adds it itself (`objectives/head.py`)."""
    pre_layer_norm_types: tuple[str, ...] = ()
    """The model types whose blocks normalise their input (pre-LN): their block outputs are raw residual sums,
    hundreds to thousands in size, which hidden-state MSE terms normalise by default (mBART, not BART)."""

    @property
    def tasks(self) -> tuple[str, ...]:
        return {"seq2seq": ("translation", "seq2seq"), "causal": ("causal_lm",), "encoder": ("masked_lm",)}[self.kind]

    def model_class(self, config: PretrainedConfig, checkpoint: set[str] | None = None) -> type:
        """The head class that matches the checkpoint: a bare `BertModel` stays bare (no LM head to invent).
        `checkpoint`: the tensor names in its weight files, where they could be read."""
        architectures = getattr(config, "architectures", None) or []
        if (
            self.kind == "encoder"
            and architectures
            and not any("MaskedLM" in a or "PreTraining" in a for a in architectures)
        ):
            return transformers.AutoModel
        return {
            "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "causal": transformers.AutoModelForCausalLM,
            "encoder": transformers.AutoModelForMaskedLM,
        }[self.kind]

    def from_config(self, config: PretrainedConfig) -> torch.nn.Module:
        """A randomly initialised model of this architecture (on the current default device), fused kernels on."""
        model_class = self.model_class(config)
        model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
        use_fused_kernels(model)
        return model

    def from_pretrained(self, name_or_path: str, role: str = "model", **kwargs) -> torch.nn.Module:
        """`from_pretrained` with this family's head class (also under ZeRO-3 partitioned loading), fused
        kernels on. A tensor the model needs and the checkpoint lacks (it would start random), or one of the
        wrong shape, is an error; so is a tensor the model has no place for, unless `optional_parts` names it."""
        model_class = self.model_class(AutoConfig.from_pretrained(name_or_path), checkpoint_keys(name_or_path))
        model, info = model_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        optional = [k for k in missing + unexpected if self.optional_parts and k.startswith(self.optional_parts)]
        problems = {
            "missing (would start random)": [k for k in missing if k not in optional],
            "of the wrong shape": sorted(str(k) for k in info["mismatched_keys"]),
            "not in the model": [k for k in unexpected if k not in optional],
        }
        problems = {what: keys for what, keys in problems.items() if keys}
        if problems:
            listed = "; ".join(
                f"{what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}" for what, keys in problems.items()
            )
            raise ConfigError(
                f"{role} {name_or_path} does not fit its config ({model_class.__name__}): {listed}. "
                "Check that config.json and the weights belong together"
            )
        if optional:
            dist.print_main(
                f"{role} {name_or_path}: {len(optional)} tensors of parts distillation does not read are missing or "
                f"extra ({optional[0]}, ...); left as they are"
            )
        use_fused_kernels(model)
        return model

    def has_lm_head(self, config: PretrainedConfig) -> bool:
        return self.model_class(config) is not transformers.AutoModel

    def shrink(self, config: PretrainedConfig, dims: FromTeacherConfig) -> PretrainedConfig:
        """The teacher's config with the given depth and width; other settings (vocabulary, activation) kept."""
        student = copy.deepcopy(config)
        for dim in DIMENSIONS:
            value = getattr(dims, dim)
            if value is None:
                continue
            if dim not in self.config_fields:
                valid = ", ".join(d for d in DIMENSIONS if d in self.config_fields)
                raise ConfigError(
                    f"student.init.from_teacher.{dim} does not apply to {self.name} ({self.kind}) models; use {valid}"
                )
            if value < 1:
                raise ConfigError(f"student.init.from_teacher.{dim} must be at least 1, got {value}")
            teachers = getattr(config, self.config_fields[dim][0])
            if dims.strategy == "sliced" and teachers is not None and value > teachers:  # (GPT-2's n_inner: None)
                raise ConfigError(f"student.init.from_teacher.{dim} {value} is more than the teacher's {teachers}: "
                                  "a student cut from the teacher keeps a part of it")  # fmt: skip
            for attr in self.config_fields[dim]:
                setattr(student, attr, value)
        self._check_heads(student)
        student.architectures = config.architectures
        return student

    # -- layers and feature sites ------------------------------------------------------------------------
    def depths(self, config: PretrainedConfig) -> dict[str, int]:
        """Blocks per stack, e.g. {"encoder": 24, "decoder": 24}; read from the config, no weights needed."""
        return {stack: getattr(config, self.config_fields[f"{stack}_layers"][0]) for stack in self.layout}

    def width(self, config: PretrainedConfig) -> int:
        return getattr(config, self.config_fields["d_model"][0])

    def num_heads(self, config: PretrainedConfig) -> int:
        return getattr(config, self.config_fields["num_heads"][0])

    def attention_widths(self, config: PretrainedConfig) -> tuple[int, int]:
        """Output widths of the query and of the key/value projections."""
        return self.width(config), self.width(config)

    def blocks(self, model: torch.nn.Module, stack: str) -> torch.nn.ModuleList:
        return model.base_model.get_submodule(self.layout[stack].blocks)

    def site(self, model: torch.nn.Module, stack: str, layer: int, name: str) -> tuple[torch.nn.Module, Site]:
        """The module that produces feature `name` of `layer` (0: embeddings, i: block i), and how to read it."""
        blocks = self.blocks(model, stack)
        if name == "hidden":
            if layer == 0:  # the embeddings' output is what the first block receives
                return blocks[0], Site("", read="input")
            return blocks[layer - 1], Site("", index=0)
        if layer == 0:
            raise ConfigError(f"{name} is a feature of a block; layer 0 (the embeddings) has none")
        sites = self.layout[stack].sites
        if name not in sites:
            raise ConfigError(f"{self.name} {stack} blocks have no '{name}' (they have: {', '.join(sites)})")
        site = sites[name]
        return blocks[layer - 1].get_submodule(site.path), site

    def _check_heads(self, config: PretrainedConfig) -> None:
        width = getattr(config, self.config_fields["d_model"][0])
        heads = getattr(config, self.config_fields["num_heads"][0])
        if self.narrow_heads and width % heads:  # T5 (d_kv) and the Llama family (head_dim) set their own head width
            raise ConfigError(f"d_model {width} is not divisible by num_heads {heads}; pick widths that divide")


@dataclass(frozen=True)
class T5Adapter(ModelAdapter):
    def attention_widths(self, config: PretrainedConfig) -> tuple[int, int]:
        return config.num_heads * config.d_kv, config.num_heads * config.d_kv

    def model_class(self, config: PretrainedConfig, checkpoint: set[str] | None = None) -> type:
        if getattr(config, "scale_decoder_outputs", True):  # original T5: the head is the embedding
            return super().model_class(config)
        if checkpoint is not None and "lm_head.weight" not in checkpoint:
            # a v1.1-style config saved with a tied head (what transformers 5 writes for T5Config(
            # tie_word_embeddings=False)): the stock class ties it, as transformers' own loading does
            return super().model_class(config)
        return T5WithSeparateHead


@dataclass(frozen=True)
class DecoderOnlyAdapter(ModelAdapter):
    """Llama-style configs: grouped key/value heads follow the new head count; the head width stays the
    teacher's (rotary embeddings pair a head's channels, so heads are cut whole, and Qwen3's head width is its
    own, not d_model / num_heads)."""

    def attention_widths(self, config: PretrainedConfig) -> tuple[int, int]:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        key_value_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return config.num_attention_heads * head_dim, key_value_heads * head_dim

    def shrink(self, config: PretrainedConfig, dims: FromTeacherConfig) -> PretrainedConfig:
        student = super().shrink(config, dims)
        heads = student.num_attention_heads
        if getattr(config, "num_key_value_heads", None) is not None:
            groups = max(1, config.num_attention_heads // config.num_key_value_heads)
            student.num_key_value_heads = max(1, heads // groups)
        student.head_dim = self.attention_widths(config)[0] // config.num_attention_heads
        return student


ADAPTERS: tuple[ModelAdapter, ...] = (
    T5Adapter(
        name="t5",
        model_types=("t5", "mt5", "umt5"),
        pre_layer_norm_types=("t5", "mt5", "umt5"),
        kind="seq2seq",
        config_fields={
            "encoder_layers": ("num_layers",),
            "decoder_layers": ("num_decoder_layers",),
            "d_model": ("d_model",),
            "d_ff": ("d_ff",),
            "num_heads": ("num_heads",),
        },
        layout=T5_STACKS,
        widths=T5_WIDTHS,
    ),
    ModelAdapter(
        name="bart",
        model_types=("bart", "mbart"),
        logits_bias="final_logits_bias",
        pre_layer_norm_types=("mbart",),
        kind="seq2seq",
        config_fields={
            "encoder_layers": ("encoder_layers",),
            "decoder_layers": ("decoder_layers",),
            "d_model": ("d_model",),
            "d_ff": ("encoder_ffn_dim", "decoder_ffn_dim"),
            "num_heads": ("encoder_attention_heads", "decoder_attention_heads"),
        },
        layout=BART_STACKS,
        widths=BART_WIDTHS,
        narrow_heads=True,
    ),
    ModelAdapter(
        name="gpt2",
        model_types=("gpt2",),
        pre_layer_norm_types=("gpt2",),
        kind="causal",
        config_fields={
            "decoder_layers": ("n_layer",),
            "d_model": ("n_embd",),
            "d_ff": ("n_inner",),
            "num_heads": ("n_head",),
        },
        layout=GPT2_STACKS,
        widths=GPT2_WIDTHS,
        narrow_heads=True,
    ),
    DecoderOnlyAdapter(
        name="llama",
        model_types=("llama", "qwen2", "qwen3", "mistral"),
        pre_layer_norm_types=("llama", "qwen2", "qwen3", "mistral"),
        kind="causal",
        config_fields={
            "decoder_layers": ("num_hidden_layers",),
            "d_model": ("hidden_size",),
            "d_ff": ("intermediate_size",),
            "num_heads": ("num_attention_heads",),
        },
        layout=LLAMA_STACKS,
        widths=LLAMA_WIDTHS,
    ),
    ModelAdapter(
        name="bert",
        model_types=("bert", "roberta"),
        kind="encoder",
        config_fields={
            "encoder_layers": ("num_hidden_layers",),
            "d_model": ("hidden_size",),
            "d_ff": ("intermediate_size",),
            "num_heads": ("num_attention_heads",),
        },
        layout=BERT_STACKS,
        widths=BERT_WIDTHS,
        narrow_heads=True,
        optional_parts=("cls.seq_relationship.", "bert.pooler.", "roberta.pooler.", "pooler."),
    ),
)


def adapter_for(config: PretrainedConfig) -> ModelAdapter:
    for adapter in ADAPTERS:
        if config.model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise ConfigError(f"model_type '{config.model_type}' has no adapter yet; supported: {supported}")


def count_parameters(config: PretrainedConfig) -> int:
    """Parameters of the model `config` describes, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = adapter_for(config).from_config(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
