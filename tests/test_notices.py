"""The notices libraries print for their own maintainers are dropped, each triggered for real; others stay."""

import enum
import logging
import warnings

import pytest
import torch
import torch.utils._pytree as pytree

from fittune.notices import quiet_maintainer_notices


def _deprecated_collectives() -> None:
    """What DeepSpeed's ZeRO steps call; the deprecation warning comes before the missing process group."""
    t = torch.zeros(2)
    for call in (lambda: torch.distributed.all_gather_into_tensor(t, t),
                 lambda: torch.distributed.reduce_scatter_tensor(t, t)):
        with pytest.raises((ValueError, RuntimeError)):
            call()


def _peft_reads_the_deprecated_alias() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert model.is_gradient_checkpointing is False


def _ddp_without_buffer_broadcasts() -> None:
    """What accelerate builds from fittune's DistributedDataParallelKwargs(broadcast_buffers=False)."""
    import tempfile

    import torch.distributed as dist

    store = dist.FileStore(f"{tempfile.mkdtemp()}/store", 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2), broadcast_buffers=False)
    finally:
        dist.destroy_process_group()


def _warnings_of(trigger) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_maintainer_notices()  # after simplefilter, as run_cli's call comes after Python's defaults
        trigger()
        warnings.warn("a FutureWarning of fittune's own", FutureWarning)
    return [str(w.message) for w in seen]


@pytest.mark.parametrize("trigger", [_deprecated_collectives, _peft_reads_the_deprecated_alias,
                                     _ddp_without_buffer_broadcasts])
def test_library_deprecations_are_dropped_and_other_warnings_kept(trigger):
    assert _warnings_of(trigger) == ["a FutureWarning of fittune's own"]


def test_accelerates_tied_weights_notice_is_dropped_and_its_other_warnings_kept():
    from accelerate import PartialState
    from accelerate.utils.other import clean_state_dict_for_safetensors

    PartialState(cpu=True)  # accelerate's logger needs it, as in every run

    shared = torch.zeros(2)
    kept, log = [], logging.getLogger("accelerate.utils.other")

    class Keep(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())

    handler = Keep(logging.WARNING)
    quiet_maintainer_notices()
    log.addHandler(handler)
    try:
        state = clean_state_dict_for_safetensors({"embed.weight": shared, "lm_head.weight": shared})
        log.warning("another accelerate warning")
    finally:
        log.removeHandler(handler)
    assert list(state) == ["embed.weight"] and kept == ["another accelerate warning"]


def test_torchaos_pytree_notice_is_dropped_and_other_pytree_warnings_kept():
    class Kind(str, enum.Enum):  # what torchao registers (its enums compare as strings)
        A = "a"

    class Keep(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())

    kept, log, handler = [], logging.getLogger("torch.utils._pytree"), Keep(logging.WARNING)
    quiet_maintainer_notices()
    log.addHandler(handler)  # torch's loggers do not propagate to the root logger
    try:
        pytree.register_constant(Kind)  # the real call torchao makes on import
        log.warning("another pytree warning")
    finally:
        log.removeHandler(handler)
    assert kept == ["another pytree warning"]


def _scheduler_stepped_first() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0).step()  # before any optimizer.step()


def test_the_scheduler_order_warning_is_dropped_only_for_deepspeed_runs():
    """Every run keeps torch's check; a DeepSpeed run (whose engine steps its optimizer past the counter the
    check reads) drops it."""
    from fittune.notices import quiet_scheduler_order_notice

    for quiet, expected in ((quiet_maintainer_notices, True), (quiet_scheduler_order_notice, False)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            quiet()
            _scheduler_stepped_first()
        assert any("before `optimizer.step()`" in str(w.message) for w in seen) == expected
