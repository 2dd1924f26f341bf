"""Model and tokenizer loading (always through `from_pretrained`), LoRA, gradient checkpointing."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from fittune.config import Config
from fittune.errors import FittuneError, first_line
from fittune.precision import Precision, weights_dtype
from fittune.shards import full_numel


def _builtin_spec(cfg: Config):
    from fittune.builtin_models import builtin_spec

    return builtin_spec(cfg.model.name_or_path, cfg.model.tiny, cfg.seed)


def resolve_model_path(cfg: Config) -> str:
    """Where the base model is loaded from: a built-in model's cache directory (fittune.builtin_models,
    outside output_dir), else `model.name_or_path` itself."""
    from fittune.builtin_models import builtin_dir, is_builtin

    if is_builtin(cfg.model.name_or_path):
        return str(builtin_dir(_builtin_spec(cfg)))
    return cfg.model.name_or_path


def prepare_builtin_model(cfg: Config, accelerator) -> None:
    """Build a built-in model into the cache once (main process first), so every rank then loads the same
    files. Every process then checks it (every file's hash) under the cache's lock: on another node whose
    cache is not shared, the first process there builds it and the others wait for it. Training, evaluate.py
    (for an adapter's base) and export all come here: a cleared or damaged cache is rebuilt, and said."""
    from fittune.builtin_models import ensure_builtin, is_builtin

    if not is_builtin(cfg.model.name_or_path):
        return
    spec = _builtin_spec(cfg)  # a missing package fails here, on every rank, before any waiting
    with accelerator.main_process_first():
        ensure_builtin(spec, accelerator.print)


def _load_error(path: str, e: Exception) -> FittuneError:
    first = first_line(e)
    if not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        return FittuneError(f"model not found: '{path}' is not a local directory nor a hub id "
                            f"(like Qwen/Qwen2.5-3B-Instruct); fix model.name_or_path")
    return FittuneError(f"cannot load model '{path}': {first} (check model.name_or_path; hub ids need network)")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load the tokenizer; right padding for training; a pad token when the model has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # loss masks pads by label, so sharing EOS is safe
    tok.padding_side = "right"
    return tok


def hub_kernel_fallback(attn_implementation: str, model_class: type | None = None) -> str | None:
    """The Hub kernel repository whose code transformers would download and run for `attn_implementation`
    (`flash_attention_N`, `paged|` or not: the Hub kernel a model class names as its own flash attention, or
    the package's Hub stand-in where the package is not installed and the `kernels` package is); None:
    installed code only."""
    impl = attn_implementation.removeprefix("paged|")  # transformers drops the prefix before choosing
    if not impl.startswith("flash_attention_"):
        return None
    own = getattr(model_class, "_compatible_flash_implementations", None) or []
    if own and impl not in own:  # transformers switches to the model's own choice: a Hub kernel, or a package's
        return own[0] if "/" in own[0] else hub_kernel_fallback(own[0])
    try:
        from transformers.modeling_flash_attention_utils import (
            FLASH_ATTENTION_COMPATIBILITY_MATRIX,
            FLASH_ATTN_KERNEL_FALLBACK,
        )
        from transformers.utils import is_kernels_available
    except ImportError:  # another transformers: no such fallback known
        return None
    version = impl.removeprefix("flash_attention_")
    entry = FLASH_ATTENTION_COMPATIBILITY_MATRIX.get(int(version)) if version.isdigit() else None
    if entry is None or not is_kernels_available() or entry["general_availability_check"]():
        return None
    return FLASH_ATTN_KERNEL_FALLBACK.get(impl)


def _causal_lm_class(path: str) -> type | None:
    """The transformers class `from_pretrained` would build for `path`, from its config alone, running none of
    its own code (None: not known that way)."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        return MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path, trust_remote_code=False))]
    except (OSError, ValueError, KeyError):
        return None


def load_model(path: str, cfg: Config, dtype: torch.dtype):
    """`from_pretrained` with the configured dtype and attention kernel (never code from the Hub unless
    model.trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    impl = cfg.model.attn_implementation
    flash = not cfg.model.trust_remote_code and "flash_attention_" in impl
    fallback = hub_kernel_fallback(impl, _causal_lm_class(path)) if flash else None
    if fallback is not None:
        raise FittuneError(f"model.attn_implementation {impl}: transformers would download and run the Hub kernel "
                           f"{fallback} for it (the package is not installed here, or the model names that kernel "
                           f"as its flash attention): use sdpa, install the package, or pass "
                           f"--model.trust_remote_code true to allow that code")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    model.config.use_cache = False  # the KV cache is useless while training and costs memory
    return model


# Liger's per-architecture patches that take the same switches (rope, rms_norm, swiglu, the two losses, model)
LIGER_PATCHES = {"qwen2": "apply_liger_kernel_to_qwen2", "qwen3": "apply_liger_kernel_to_qwen3",
                 "llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral"}


def use_liger(cfg: Config, model, device_map: bool) -> bool:
    """Whether to use Liger kernels (train.kernels): `auto` when installed, on a GPU, for an architecture
    Liger patches (LIGER_PATCHES), never with a device map. `device_map`: the model is (to be) spread by
    `model.parallel: auto` (the run's `Strategy.device_map`)."""
    import importlib.util

    mode = cfg.train.kernels
    if mode == "torch":
        return False
    model_type = getattr(model.config, "model_type", None)
    known = model_type in LIGER_PATCHES
    # a device map puts layers on other GPUs or the CPU, where Liger's Triton kernels (launched on the
    # current GPU) cannot run
    ok = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None and known and not device_map
    if mode == "auto":
        # measured on an H200 (bench/RESULTS.md): faster for LoRA; slower for full fine-tuning, where the
        # fused head casts the fp32 master head weight and accumulates its gradient in the forward pass
        return ok and cfg.lora.enabled
    if not known:
        raise FittuneError(f"train.kernels: liger has no patch for model type '{model_type}' (fittune applies "
                           f"Liger to {', '.join(sorted(LIGER_PATCHES))}); use train.kernels: auto or torch")
    if not ok:
        raise FittuneError("train.kernels: liger needs a CUDA GPU, `pip install liger-kernel` and the model on "
                           "one device per process (not model.parallel: auto); use train.kernels: auto (Liger "
                           "when available) or torch")
    return ok


def apply_liger(model) -> None:
    """Liger's fused RMSNorm, SwiGLU and RoPE on this model, by architecture (the fused head +
    cross-entropy lives in fittune.loss). RoPE is patched module-wide in transformers' code for that
    architecture: it runs only on the GPU path."""
    import liger_kernel.transformers as liger

    patch = getattr(liger, LIGER_PATCHES[model.config.model_type])
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)


def apply_lora(model, cfg: Config):
    """Wrap the model with a PEFT LoRA adapter (trainable adapters in fp32, frozen base)."""
    from peft import LoraConfig, get_peft_model

    _check_target_names(model, cfg.lora.target_modules)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        # autocast_adapter_dtype (default): adapters stay fp32 even on a bf16/fp16 base
        return get_peft_model(model, lora)
    except ValueError as e:
        raise FittuneError(f"cannot apply LoRA: {e} (check lora.target_modules)") from None


def _check_target_names(model, targets: str | list[str]) -> None:
    """Every name in a list of lora.target_modules must be some module's (PEFT matches a name on the last
    parts of a module's path, and adapts the modules the other names match: a typo was dropped silently)."""
    if isinstance(targets, str):
        return
    paths = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets if not any(p == t or p.endswith("." + t) for p in paths)]
    if unknown:
        linear = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise FittuneError(f"lora.target_modules names {', '.join(map(repr, unknown))}, which no module of the model "
                           f"is called; its linear layers are: {', '.join(linear)} (or all-linear)")


def enable_gradient_checkpointing(model, lora: bool) -> None:
    """Non-reentrant checkpointing; with LoRA, make the embeddings' output require grad so gradients flow."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers' current name; gradient_checkpointing_enable warns (removed in v6)
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model.enable_input_require_grads()


def build_model(cfg: Config, precision: Precision, device_map: bool):
    """The model to train: loaded, optionally LoRA-wrapped, optionally checkpointed. `device_map`: as in
    `use_liger`."""
    path = resolve_model_path(cfg)
    model = load_model(path, cfg, weights_dtype(cfg, precision))
    if use_liger(cfg, model, device_map):
        apply_liger(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.lora.enabled)
    return model


def decoder_layers(model) -> list:
    """The model's repeated blocks: the classes transformers never splits (`_no_split_modules`, e.g.
    Qwen2DecoderLayer, LlamaDecoderLayer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def compile_layers(model) -> int:
    """`torch.compile` every decoder layer in place (regional compilation); returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        # dynamic: one graph for every sequence length. Without it each new length compiled a graph of its own
        # (the layers' inputs change shape with the batch's padded length), and past torch's recompile limit
        # (8) the layers ran uncompiled for the rest of the run
        layer.compile(dynamic=True)
    return len(layers)


def compiled_graphs() -> int:
    """How many graphs torch.compile has built in this process: the compiled layers' (which they share) and
    any other compiled code's, e.g. torchao's low-bit optimizer step (one graph per parameter shape)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class ParameterCount(NamedTuple):
    total: int
    trainable: int


def count_parameters(model) -> ParameterCount:
    """The total and trainable parameter counts of the whole model, also when ZeRO-3 has partitioned it (each
    parameter then holds an empty placeholder)."""
    sizes = [(full_numel(p), p.requires_grad) for p in model.parameters()]
    return ParameterCount(sum(n for n, _ in sizes), sum(n for n, trainable in sizes if trainable))


def load_trained_model(checkpoint: Path, cfg: Config, dtype: torch.dtype):
    """Load a saved adapter (onto the config's base model) or a full model directory, for evaluation."""
    if (checkpoint / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = resolve_model_path(cfg)
        base = load_model(base_path, cfg, dtype)
        try:
            return PeftModel.from_pretrained(base, str(checkpoint), is_trainable=False)
        except RuntimeError as e:  # size mismatch: the adapter was trained on another base model
            first = str(e).strip().splitlines()
            detail = next((ln.strip() for ln in first if "size mismatch" in ln), first[0] if first else "")
            raise FittuneError(f"adapter {checkpoint} does not fit base model {base_path} ({detail}); "
                               f"point --model.name_or_path at the model it was trained on") from None
        except Exception as e:  # a truncated or corrupt safetensors file raises safetensors' own error types
            raise FittuneError(f"cannot load adapter {checkpoint}: {type(e).__name__}: {str(e).splitlines()[0]} "
                               f"(the checkpoint is damaged or incomplete)") from None
    if not (checkpoint / "config.json").is_file():
        raise FittuneError(f"{checkpoint} holds neither a model (config.json) nor an adapter "
                           f"(adapter_config.json): pass a training output dir or its final/")
    try:
        return load_model(str(checkpoint), cfg, dtype)
    except FittuneError:
        raise
    except Exception as e:  # a truncated or corrupt safetensors file raises safetensors' own error types
        raise FittuneError(f"cannot load model from {checkpoint}: {type(e).__name__}: {str(e).splitlines()[0]} "
                           f"(the checkpoint is damaged or incomplete)") from None
