"""The training loop, on a custom Accelerate loop. Read it top to bottom: setup, data, model, steps, save, eval."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from fittune import data as D
from fittune.checkpoints import (CheckpointTarget, check_compatible, complete_checkpoints, find_resume_checkpoint,
                                 load_checkpoint, partial_checkpoints, read_state, save_checkpoint)
from fittune.config import Config, to_yaml
from fittune.distributed import configure_deepspeed, make_accelerator, strategy_name, sum_across_ranks, zero_stage
from fittune.errors import FittuneError
from fittune.evaluation import (build_predictions, class_name, compute_metrics, evaluate_and_report,
                                majority_baseline, run_evaluation)
from fittune.loss import install_chunked_loss, nll_sum
from fittune.model import (build_model, compile_layers, count_parameters, load_tokenizer, prepare_builtin_model,
                           resolve_model_path, use_liger, weights_dtype)
from fittune.placement import check_not_distributed, input_device, place_model
from fittune.reports import metrics_table, plot_loss_curve
from fittune.signals import StopRequest
from fittune.strategy import strategy_of


def resolve_mixed_precision(cfg: Config) -> str:
    """The precision to use; a recipe that contradicts the launcher's setting is an error, not a guess."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    wanted = cfg.train.mixed_precision
    if wanted == "auto":
        return launcher
    if wanted == "best":
        if not torch.cuda.is_available():
            wanted = "no"
        else:
            wanted = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if launcher not in ("no", wanted):
        raise FittuneError(f"train.mixed_precision is '{wanted}' but the accelerate launch config says "
                           f"'{launcher}': make them agree (or set train.mixed_precision: auto)")
    return wanted


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _log(accelerator, msg: str) -> None:
    accelerator.print(f"fittune: {msg}", flush=True)


def save_final(model, accelerator, tokenizer, out: Path, config_yaml: str) -> Path:
    """Save `final/` (adapter or full model + tokenizer) loadable without fittune; verified, then renamed."""
    import shutil

    final, tmp = out / "final", out / "final.tmp"
    # gathered from every rank's shards under ZeRO-3 (a collective: every rank calls it)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        # a copy: with a device map (hf_device_map), save_pretrained empties the dict it is given
        unwrapped.save_pretrained(tmp, state_dict=dict(state_dict), safe_serialization=True)
        checked = verify_export(tmp, unwrapped, state_dict)
        _log(accelerator, f"final/: {checked} saved tensors verified equal to the live (gathered) weights")
        tokenizer.save_pretrained(tmp)
        (tmp / "fittune_config.yaml").write_text(config_yaml)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def verify_export(directory: Path, unwrapped, state_dict: dict) -> int:
    """Check the saved weights against the live (gathered) ones: the classic ZeRO-3 failure is an empty or
    partial adapter_model.safetensors that loads silently. Raises RuntimeError, and final/ is not written."""
    from safetensors.torch import load_file

    if hasattr(unwrapped, "peft_config"):
        from peft import get_peft_model_state_dict

        expected = get_peft_model_state_dict(unwrapped, state_dict=state_dict)
        files = [directory / "adapter_model.safetensors"]
    else:
        expected = state_dict
        files = sorted(directory.glob("model*.safetensors"))
    saved = {}
    for f in files:
        if not f.is_file():
            raise RuntimeError(f"export check failed: {f.name} was not written")
        saved.update(load_file(f))
    problems = [k for k, v in saved.items() if v.numel() == 0 or k not in expected
                or v.shape != expected[k].shape or not torch.equal(v.cpu(), expected[k].detach().cpu().to(v.dtype))]
    tied = {"lm_head.weight"} if getattr(getattr(unwrapped, "config", None), "tie_word_embeddings", False) else set()
    missing = [k for k in expected if k not in saved and k not in tied]
    if problems or missing or not saved:
        raise RuntimeError(f"export check failed in {directory}: {len(problems)} saved tensors are empty or differ "
                           f"from the live weights (e.g. {problems[:3]}), {len(missing)} are missing "
                           f"(e.g. {missing[:3]}); final/ was not written")
    return len(saved)


def train(cfg: Config) -> dict:
    """Run one fine-tuning job end to end; returns the final held-out metrics."""
    # ---- setup -------------------------------------------------------------------------------------------
    mixed = resolve_mixed_precision(cfg)
    out = Path(cfg.output_dir)
    resume_from = find_resume_checkpoint(out, cfg.resume)
    try:
        accelerator = make_accelerator(mixed, cfg.train.grad_accum,
                                       None if cfg.log_with == "none" else cfg.log_with, str(out))
    except ValueError as e:  # e.g. fp16 requested on a machine without a GPU
        raise FittuneError(f"cannot set up accelerate: {e}") from None
    if mixed == "bf16" and accelerator.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FittuneError("this GPU has no bf16: use --train.mixed_precision fp16")
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    world, rank = accelerator.num_processes, accelerator.process_index

    if cfg.model.parallel == "auto":
        check_not_distributed(world, accelerator.distributed_type.value)

    # ---- data (read and mapped before the model loads, so bad input fails in seconds) ---------------------
    train_examples, test_examples = D.load_splits(cfg.data, cfg.seed)
    class_task = D.is_class_task(cfg.data)
    prepare_builtin_model(cfg, accelerator)
    model_path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    train_set, train_stats = D.tokenize_examples(train_examples, tokenizer, cfg.data)
    test_set, test_stats = D.tokenize_examples(test_examples, tokenizer, cfg.data)
    if not test_set:
        raise FittuneError("no held-out example fits data.max_length: raise it or check the data")
    lengths = [len(x) for x in train_set]
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    if accelerator.distributed_type.value == "DEEPSPEED":
        if cfg.train.oom_adaptive and zero_stage(accelerator) == 3:
            raise FittuneError("train.oom_adaptive does not work under ZeRO-3 (its forward pass gathers weights "
                               "with collectives, so a rank that fails mid-forward leaves the others waiting): use "
                               "ZeRO-2 (+offload) with it, or turn it off and pick the micro-batch with "
                               "python -m fittune.plan")
        configure_deepspeed(accelerator, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.max_grad_norm)
    if cfg.train.oom_adaptive and accelerator.distributed_type.value == "FSDP":
        raise FittuneError("train.oom_adaptive does not work under FSDP2 (its forward pass gathers weights with "
                           "collectives, so a rank that fails mid-forward leaves the others waiting): use DDP or "
                           "ZeRO-2 with it, or turn it off and pick the micro-batch with python -m fittune.plan")
    total_steps, steps_per_epoch = D.count_steps(len(train_set), global_batch, cfg.train.max_steps, cfg.train.epochs)

    facts = {
        "world_size": world, "mixed_precision": mixed, "strategy": strategy_name(accelerator),
        "device": str(accelerator.device), "model_path": model_path, "global_batch_size": global_batch,
        "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "train_examples": len(train_set), "heldout_examples": len(test_set),
        "truncated_rows": train_stats.truncated + test_stats.truncated,
        "dropped_rows": train_stats.dropped + test_stats.dropped,
        "resumed_from": str(resume_from) if resume_from else None,
    }
    config_yaml = to_yaml(cfg, facts)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for partial in partial_checkpoints(out):  # a save that a crash cut short: never resumed from
            _log(accelerator, f"removing incomplete checkpoint {partial}")
            shutil.rmtree(partial, ignore_errors=True)
        (out / "config.yaml").write_text(config_yaml)
        (out / "heldout_ids.json").write_text(json.dumps({"ids": [x.id for x in test_set]}, indent=0))
        if resume_from is None:
            (out / "train_log.jsonl").write_text("")
        _log(accelerator, "resolved config\n" + config_yaml.rstrip())
        if facts["dropped_rows"]:
            _log(accelerator, f"dropped {facts['dropped_rows']} rows whose answer does not fit data.max_length "
                              f"(e.g. {(train_stats.dropped_ids + test_stats.dropped_ids)[0]})")
        if cfg.resume == "auto" and resume_from is None:
            _log(accelerator, f"--resume auto: no complete checkpoint in {out}, starting fresh")

    # ---- model and optimizer ------------------------------------------------------------------------------
    set_seed(cfg.seed)  # the same adapter initialisation whatever ran before (data, model download/build)
    model = build_model(cfg, mixed)
    if cfg.train.compile:
        if accelerator.distributed_type.value in ("DEEPSPEED", "FSDP"):
            raise FittuneError("train.compile works with one process, DDP and model.parallel: auto, not under "
                               "DeepSpeed or FSDP2 (their hooks run inside each layer call): turn it off there")
        _log(accelerator, f"torch.compile: {compile_layers(model)} decoder layers (the first steps compile)")
    liger = use_liger(cfg, model)
    head = model.get_output_embeddings() if install_chunked_loss(model, cfg.train.loss_chunk_size, liger) else None
    if liger:
        _log(accelerator, "Liger kernels: RMSNorm, SwiGLU, RoPE" + (", fused output head + cross-entropy" if head else ""))
    n_total, n_trainable = count_parameters(model)
    _log(accelerator, f"parameters: {n_total:,} total, {n_trainable:,} trainable")
    if cfg.model.parallel == "auto":
        device_map = place_model(model, cfg.model.max_memory, weights_dtype(cfg, mixed))
        _log(accelerator, f"model.parallel: auto placed the blocks on {sorted(set(map(str, device_map.values())))}: "
                          f"{device_map}")
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW needs every parameter on a GPU: the device map may keep some on the CPU; otherwise
    # accelerate moves the model to the GPU in prepare() below
    fused = (all(p.device.type == "cuda" for p in params) if cfg.model.parallel == "auto"
             else accelerator.device.type == "cuda")
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas,
                                  weight_decay=cfg.train.weight_decay, fused=fused, foreach=not fused)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=round(cfg.train.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    # the scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it per process)
    # a device map placed the model already (even all on one device): accelerate must not move it
    # (DeepSpeed refuses any device_placement argument; a device map never runs under it)
    placement = {"device_placement": [False, True]} if cfg.model.parallel == "auto" else {}
    model, optimizer = accelerator.prepare(model, optimizer, **placement)
    in_device = input_device(model) if cfg.model.parallel == "auto" else accelerator.device
    # FSDP2 replaces every parameter with a sharded DTensor one: clip and check the live ones
    params = [p for p in model.parameters() if p.requires_grad]
    target = CheckpointTarget(accelerator, strategy_of(accelerator, cfg.model.parallel), model, optimizer, scheduler,
                              cfg.lora.enabled)
    fingerprint = {"model": model_path, "lora": cfg.lora.model_dump() if cfg.lora.enabled else None,
                   "trainable_parameters": n_trainable, "global_batch_size": global_batch, "seed": cfg.seed,
                   "data": cfg.data.path, "total_steps": total_steps}
    counters = {"step": 0, "optimizer_steps": 0, "skipped_overflow": 0, "skipped_nonfinite": 0,
                "pad_slots": 0, "real_tokens": 0, "micro_batch_size": cfg.train.micro_batch_size,
                "grad_accum": cfg.train.grad_accum}
    if resume_from is not None:
        state = read_state(resume_from)
        check_compatible(state, fingerprint, resume_from)
        how = load_checkpoint(target, resume_from, state, cfg.trust_checkpoint)
        counters.update({k: state[k] for k in counters if k in state})
        if state.get("world_size") != world:  # another layout: keep the global batch, not the old split
            counters["micro_batch_size"], counters["grad_accum"] = cfg.train.micro_batch_size, cfg.train.grad_accum
        accelerator.gradient_accumulation_steps = counters["grad_accum"]
        if accelerator.distributed_type.value == "DEEPSPEED":  # an adapted micro-batch (train.oom_adaptive)
            model.set_train_micro_batch_size(counters["micro_batch_size"])
            model.set_train_batch_size(global_batch)
        if accelerator.is_main_process:
            _truncate_log(out / "train_log.jsonl", counters["step"])
        _log(accelerator, f"resumed from {resume_from} at step {counters['step']} ({how} restore)")
    if cfg.log_with != "none":
        accelerator.init_trackers("tensorboard", config={k: v for k, v in _flat(cfg.model_dump()).items()
                                                         if isinstance(v, (int, float, str, bool))})

    compare = {}
    if class_task or any(x.candidates for x in test_set):
        compare["majority"] = majority_baseline([class_name(x, x.gold, class_task) for x in train_set if x.candidates],
                                                [class_name(x, x.gold, class_task) for x in test_set if x.candidates])
    if cfg.eval.before_training and resume_from is None:
        compare["untrained"] = evaluate_and_report(model, accelerator, cfg, tokenizer, test_set, class_task,
                                                   out / "eval_untrained", "untrained", compare)

    def checkpoint(step: int) -> Path:
        state = {**counters, "step": step, "world_size": world, "strategy": strategy_name(accelerator),
                 "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                 "fingerprint": fingerprint}
        path = save_checkpoint(target, out, step, state, config_yaml, cfg.train.keep_checkpoints)
        _log(accelerator, f"saved checkpoint {path}")
        return path

    # ---- the loop -----------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    stop = StopRequest()
    progress = tqdm(total=total_steps, initial=counters["step"], disable=not accelerator.is_main_process,
                    desc="training", dynamic_ncols=True)
    model.train()
    plan, plan_epoch, bad_in_a_row = None, -1, 0
    t_last, tokens_since = time.perf_counter(), 0
    for step in range(counters["step"], total_steps):
        epoch = step // steps_per_epoch
        if epoch != plan_epoch:
            plan = D.plan_global_batches(lengths, global_batch, cfg.seed, epoch, cfg.data.group_by_length)
            plan_epoch = epoch
        batch_ids = plan[step % steps_per_epoch]
        n_targets = sum(train_set[j].n_targets for j in batch_ids)  # same on every rank: no communication
        while True:
            micro_batches = D.micro_batches_for_rank(batch_ids, lengths, counters["micro_batch_size"],
                                                     counters["grad_accum"], world, rank)
            if cfg.train.oom_adaptive and accelerator.distributed_type.value == "DEEPSPEED":
                # builds each micro-batch itself, inside its out-of-memory guard
                batches = None
                result = deepspeed_adaptive_step(accelerator, model, optimizer, scheduler, params, micro_batches,
                                                 lambda rows: {k: v.to(in_device) for k, v in D.collate_train(
                                                     [train_set[j] for j in rows], tokenizer.pad_token_id).items()},
                                                 n_targets, head, mixed, counters, step, global_batch)
                break
            batches = [{k: v.to(in_device) for k, v in D.collate_train([train_set[j] for j in micro],
                                                                               tokenizer.pad_token_id).items()}
                       for micro in micro_batches]
            if not cfg.train.oom_adaptive:
                result = train_step(accelerator, model, optimizer, scheduler, params, batches, n_targets, head,
                                    cfg.train.max_grad_norm, mixed)
                break
            result = adaptive_train_step(accelerator, model, optimizer, scheduler, params, batches, n_targets, head,
                                         cfg.train.max_grad_norm, mixed)
            if result is not None:
                break
            if counters["micro_batch_size"] == 1:
                progress.close()
                raise FittuneError(f"out of memory at step {step + 1} even with micro-batch 1: shorten "
                                   f"data.max_length, turn on train.gradient_checkpointing or LoRA, or pick a "
                                   f"ZeRO offload config (python -m fittune.plan shows what fits)")
            # same global batch: half the micro-batch (1 for an odd one), that many times more accumulation
            old = counters["micro_batch_size"]
            counters["micro_batch_size"] = old // 2 if old % 2 == 0 else 1
            counters["grad_accum"] *= old // counters["micro_batch_size"]
            accelerator.gradient_accumulation_steps = counters["grad_accum"]
            _log(accelerator, f"out of memory at step {step + 1}: micro-batch -> {counters['micro_batch_size']}, "
                              f"accumulation -> {counters['grad_accum']}; redoing the step")
        del batches
        step_nll, grad_norm, stepped, overflow = result
        counters["pad_slots"] += sum(len(m) * max(lengths[j] for j in m) for m in micro_batches)
        step_tokens = sum(lengths[j] for m in micro_batches for j in m)
        counters["real_tokens"] += step_tokens
        counters["skipped_overflow"] += overflow
        total_nll, total_tokens, stop_flag = sum_across_ranks(accelerator, [step_nll, step_tokens, stop.requested])
        loss = total_nll / n_targets
        if stepped and math.isfinite(loss):
            counters["optimizer_steps"] += 1
            bad_in_a_row = 0
        elif mixed != "fp16" or not math.isfinite(loss):
            counters["skipped_nonfinite"] += 1  # skipped, weights untouched (the data moves on)
            bad_in_a_row += 1
        counters["step"] = step + 1
        tokens_since += total_tokens
        progress.update(1)
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps or bad_in_a_row:
            now = time.perf_counter()
            row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), "loss": loss,
                   "lr": scheduler.get_last_lr()[0],
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
                   "peak_mem_gib": peak_memory_gib(accelerator.device),
                   "padding_frac": 1 - counters["real_tokens"] / max(1, counters["pad_slots"]),
                   "overflow_skipped": counters["skipped_overflow"], "nonfinite_skipped": counters["skipped_nonfinite"]}
            t_last, tokens_since = now, 0
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
                val = compute_metrics(build_predictions(
                    test_set[:cfg.train.val_examples],
                    run_evaluation(model, accelerator, test_set[:cfg.train.val_examples], tokenizer,
                                   cfg.eval.batch_size, 0, False, loss_only=True), class_task))
                row["val_loss"] = val["loss"]
            _write_log(accelerator, out, row)
            progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        if bad_in_a_row >= cfg.train.max_bad_steps:
            progress.close()
            deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
            # without DeepSpeed the bad steps were skipped, so the weights are the last good ones: save them
            saved = checkpoint(step + 1) if cfg.train.save_steps and not deepspeed else None
            last = saved or (complete_checkpoints(out)[-1] if complete_checkpoints(out) else None)
            raise FittuneError(f"training diverged: {bad_in_a_row} consecutive steps with a non-finite loss or "
                               f"gradient (step {step + 1}, loss {loss}, grad norm {grad_norm}); last good checkpoint: "
                               f"{last or 'none (set train.save_steps)'}; lower train.lr, keep train.max_grad_norm "
                               f"on, or use bf16 instead of fp16")
        if stop_flag:
            progress.close()
            path = checkpoint(step + 1)
            code = 128 + int(stop.requested or signal.SIGTERM)
            _log(accelerator, f"stopped by signal after step {step + 1}: checkpoint {path}; "
                              f"continue with --resume auto (exit code {code})")
            accelerator.end_training()
            sys.exit(code)
        if cfg.train.save_steps and (step + 1) % cfg.train.save_steps == 0 and step + 1 < total_steps:
            checkpoint(step + 1)
    progress.close()
    stop.restore()
    if counters["skipped_overflow"]:
        _log(accelerator, f"{counters['skipped_overflow']} steps skipped for fp16 overflow (loss scale lowered)")
    if counters["skipped_nonfinite"]:
        _log(accelerator, f"{counters['skipped_nonfinite']} steps skipped for a non-finite loss or gradient")
    if cfg.train.save_steps and counters["step"] == total_steps:
        checkpoint(total_steps)

    # ---- save and evaluate --------------------------------------------------------------------------------
    from accelerate.utils import gather_object

    first = D.micro_batches_for_rank(D.plan_global_batches(lengths, global_batch, cfg.seed, 0, cfg.data.group_by_length)[0],
                                     lengths, cfg.train.micro_batch_size, cfg.train.grad_accum, world, rank)
    report = {"rank": rank, "world_size": world, "examples_seen": total_steps * cfg.train.micro_batch_size * cfg.train.grad_accum,
              "first_step_ids": [train_set[j].id for m in first for j in m], **local_shards(model)}
    ranks = gather_object([report])  # which rows each rank trains on: proof the ranks are real
    if accelerator.is_main_process:
        (out / "ranks.json").write_text(json.dumps(ranks, indent=1))
    save_final(model, accelerator, tokenizer, out, config_yaml)
    metrics = evaluate_and_report(model, accelerator, cfg, tokenizer, test_set, class_task, out / "eval",
                                  "fine-tuned", compare)
    if accelerator.is_main_process:
        plot_loss_curve(out / "train_log.jsonl", out / "loss_curve.png")
        _log(accelerator, f"padding: {1 - counters['real_tokens'] / max(1, counters['pad_slots']):.1%} of "
                          f"micro-batch slots were padding")
        _log(accelerator, f"held-out metrics ({len(test_set)} examples)\n"
             + metrics_table({**compare, "fine-tuned": metrics}))
        _log(accelerator, f"outputs in {out}/ (final/, eval/, config.yaml, train_log.jsonl, loss_curve.png)")
    accelerator.end_training()
    return metrics


def local_shards(model) -> dict:
    """What this rank holds of the weights: {name: [local shape, full shape]} and element counts (sharded
    under FSDP2; the full tensors under DDP)."""
    shapes, local, total = {}, 0, 0
    for name, p in model.named_parameters():
        mine = p.to_local() if hasattr(p, "to_local") else p  # a DTensor shard under FSDP2
        full = list(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape aside, p itself is empty
        shapes[name] = [list(mine.shape), full]
        local, total = local + mine.numel(), total + int(getattr(p, "ds_numel", p.numel()))
    return {"local_parameter_elements": local, "parameter_elements": total, "parameter_shapes": shapes}


def train_step(accelerator, model, optimizer, scheduler, params, batches: list[dict], n_targets: int, head,
               max_grad_norm: float, mixed: str) -> tuple[float, float | None, bool, int]:
    """One optimizer step over this rank's micro-batches of a global batch.

    Returns (summed NLL of this rank's tokens, grad norm, whether the weights were updated, fp16 overflow
    skips). A step whose gradient norm is not finite is skipped (no update, no schedule step).
    """
    world, accum = accelerator.num_processes, accelerator.gradient_accumulation_steps
    step_nll, grad_norm, stepped, overflow = None, None, False, 0
    for batch in batches:
        with accelerator.accumulate(model):
            loss_sum, _ = nll_sum(model, batch, head)
            # x world x accum undoes DDP's mean over ranks and accelerate's / accum: the update is then
            # sum(NLL over the global batch) / (its target tokens), however the batch is split
            accelerator.backward(loss_sum * (world * accum / n_targets))
            step_nll = loss_sum.detach() if step_nll is None else step_nll + loss_sum.detach()
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm or float("inf"))
                # the norm comes from all-reduced gradients, so every rank takes the same branch
                if grad_norm is None or math.isfinite(float(grad_norm)) or mixed == "fp16":
                    optimizer.step()
                    if accelerator.optimizer_step_was_skipped:
                        overflow += 1  # fp16 loss-scale overflow: no update, the schedule waits
                    else:
                        stepped = True
                        scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return float(step_nll), None if grad_norm is None else float(grad_norm), stepped, overflow


_OOM_PASSED = [0]


def _maybe_inject_oom(micro: int, rank: int) -> None:
    """Test hook: FITTUNE_TEST_OOM_ABOVE=M (and optionally FITTUNE_TEST_OOM_RANK=r) raises a real
    torch.OutOfMemoryError in the forward pass whenever the micro-batch exceeds M, on that rank only;
    FITTUNE_TEST_OOM_SKIP=k lets the first k such micro-batches through (an out-of-memory mid-step)."""
    above = os.environ.get("FITTUNE_TEST_OOM_ABOVE")
    if above is not None and micro > int(above) and rank == int(os.environ.get("FITTUNE_TEST_OOM_RANK", rank)):
        if _OOM_PASSED[0] < int(os.environ.get("FITTUNE_TEST_OOM_SKIP", "0")):
            _OOM_PASSED[0] += 1
            return
        raise torch.OutOfMemoryError(f"injected by FITTUNE_TEST_OOM_ABOVE={above} (micro-batch {micro}, rank {rank})")


def adaptive_train_step(accelerator, model, optimizer, scheduler, params, batches: list[dict], n_targets: int,
                        head, max_grad_norm: float, mixed: str) -> tuple[float, float | None, bool, int] | None:
    """train_step that survives CUDA out-of-memory: returns None when any rank ran out of memory.

    Backward runs without gradient synchronisation (DDP `no_sync`), so no collective can be in flight when
    one rank fails; then one all-reduce tells every rank whether any failed; only then are the gradients
    all-reduced and the optimizer stepped. On None the caller halves the micro-batch and redoes the step.
    """
    world, accum = accelerator.num_processes, accelerator.gradient_accumulation_steps
    step_nll, failed = None, 0.0
    try:
        for batch in batches:
            _maybe_inject_oom(batch["input_ids"].shape[0], accelerator.process_index)
            with accelerator.no_sync(model):
                loss_sum, _ = nll_sum(model, batch, head)
                accelerator.backward(loss_sum * (world * accum / n_targets))
            step_nll = loss_sum.detach() if step_nll is None else step_nll + loss_sum.detach()
    except torch.OutOfMemoryError:
        failed = 1.0
    if sum_across_ranks(accelerator, [failed])[0]:
        optimizer.zero_grad(set_to_none=True)
        step_nll = loss_sum = None  # drop the failed step's activations before freeing the cache
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None
    if world > 1:  # the gradient average DDP skipped under no_sync
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= world
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm or float("inf"))
    stepped, overflow = False, 0
    if math.isfinite(float(grad_norm)) or mixed == "fp16":
        optimizer.step()
        if accelerator.optimizer_step_was_skipped:
            overflow = 1
        else:
            stepped = True
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(step_nll), float(grad_norm), stepped, overflow


def deepspeed_adaptive_step(accelerator, engine, optimizer, scheduler, params, micro_batches: list[list[int]], collate,
                            n_targets: int, head, mixed: str, counters: dict, step: int,
                            global_batch: int) -> tuple[float, float | None, bool, int]:
    """train_step for DeepSpeed ZeRO-1/2 that survives out-of-memory in the forward pass.

    ZeRO-2 reduces gradients inside backward and has no `no_sync`, so the ranks agree (one all-reduce) after
    every micro-batch's forward and before its backward. When any rank ran out of memory, every rank keeps
    the gradients already accumulated for this step (complete, valid contributions), halves the micro-batch,
    re-splits its remaining rows and goes on: the step still covers every row once with the same token
    normalisation. An out-of-memory inside backward itself is not recoverable this way (collectives are in
    flight); it stops the run.
    """
    world = accelerator.num_processes
    pending = [list(m) for m in micro_batches]
    step_nll = None
    while pending:
        rows = pending.pop(0)
        failed, loss_sum = 0.0, None
        try:
            batch = collate(rows)
            _maybe_inject_oom(len(rows), accelerator.process_index)
            loss_sum, _ = nll_sum(engine, batch, head)
        except torch.OutOfMemoryError:
            failed = 1.0
        if sum_across_ranks(accelerator, [failed])[0]:
            loss_sum = batch = None
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            old = counters["micro_batch_size"]
            if old == 1:
                raise FittuneError(f"out of memory at step {step + 1} even with micro-batch 1: shorten "
                                   f"data.max_length, turn on train.gradient_checkpointing or LoRA, or pick a "
                                   f"ZeRO offload config (python -m fittune.plan shows what fits)")
            new = old // 2 if old % 2 == 0 else 1
            counters["micro_batch_size"], counters["grad_accum"] = new, counters["grad_accum"] * (old // new)
            accelerator.gradient_accumulation_steps = counters["grad_accum"]
            engine.set_train_micro_batch_size(new)  # the engine's loss scale (1 / accumulation) follows
            engine.set_train_batch_size(global_batch)
            rest = rows + [j for m in pending for j in m]
            pending = [rest[k:k + new] for k in range(0, len(rest), new)]
            _log(accelerator, f"out of memory at step {step + 1}: micro-batch -> {new}, accumulation -> "
                              f"{counters['grad_accum']}; finishing the step with the smaller micro-batch")
            continue
        accelerator.sync_gradients = not pending  # the engine steps after the step's last micro-batch
        # x world x (the engine's accumulation) undoes its averaging: the update is sum(NLL) / target tokens
        accelerator.backward(loss_sum * (world * engine.gradient_accumulation_steps() / n_targets))
        step_nll = loss_sum.detach() if step_nll is None else step_nll + loss_sum.detach()  # no GPU sync here
    grad_norm = accelerator.clip_grad_norm_(params, 0.0)  # DeepSpeed clipped inside its step; this reads the norm
    optimizer.step()  # a no-op wrapper call: the engine already stepped
    overflow = int(bool(accelerator.optimizer_step_was_skipped))
    stepped = not overflow
    if stepped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(step_nll), None if grad_norm is None else float(grad_norm), stepped, overflow


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (the crashed run got further)."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def _write_log(accelerator, out: Path, row: dict) -> None:
    if accelerator.is_main_process:
        with open(out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"])


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
