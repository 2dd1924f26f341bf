"""The training loop, on a custom Accelerate loop. Read it top to bottom: setup, data, model, steps, save, eval."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch

from fittune import data as D
from fittune.config import Config, to_yaml
from fittune.distributed import make_accelerator, strategy_name, sum_across_ranks
from fittune.errors import FittuneError
from fittune.evaluation import (build_predictions, class_name, compute_metrics, evaluate_and_report,
                                majority_baseline, run_evaluation)
from fittune.loss import nll_sum
from fittune.model import build_model, count_parameters, load_tokenizer, prepare_builtin_model, resolve_model_path
from fittune.reports import metrics_table, plot_loss_curve


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
    """Save `final/` (adapter or full model + tokenizer) loadable without fittune; atomic rename."""
    final, tmp = out / "final", out / "final.tmp"
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3: every rank calls it
    if accelerator.is_main_process:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "fittune_config.yaml").write_text(config_yaml)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def train(cfg: Config) -> dict:
    """Run one fine-tuning job end to end; returns the final held-out metrics."""
    # ---- setup -------------------------------------------------------------------------------------------
    mixed = resolve_mixed_precision(cfg)
    out = Path(cfg.output_dir)
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
    total_steps, steps_per_epoch = D.count_steps(len(train_set), global_batch, cfg.train.max_steps, cfg.train.epochs)

    facts = {
        "world_size": world, "mixed_precision": mixed, "strategy": strategy_name(accelerator),
        "device": str(accelerator.device), "model_path": model_path, "global_batch_size": global_batch,
        "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "train_examples": len(train_set), "heldout_examples": len(test_set),
        "truncated_rows": train_stats.truncated + test_stats.truncated,
        "dropped_rows": train_stats.dropped + test_stats.dropped,
    }
    config_yaml = to_yaml(cfg, facts)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml)
        (out / "heldout_ids.json").write_text(json.dumps({"ids": [x.id for x in test_set]}, indent=0))
        (out / "train_log.jsonl").write_text("")
        _log(accelerator, "resolved config\n" + config_yaml.rstrip())
        if facts["dropped_rows"]:
            _log(accelerator, f"dropped {facts['dropped_rows']} rows whose answer does not fit data.max_length "
                              f"(e.g. {(train_stats.dropped_ids + test_stats.dropped_ids)[0]})")

    # ---- model and optimizer ------------------------------------------------------------------------------
    model = build_model(cfg, mixed)
    n_total, n_trainable = count_parameters(model)
    _log(accelerator, f"parameters: {n_total:,} total, {n_trainable:,} trainable")
    params = [p for p in model.parameters() if p.requires_grad]
    fused = accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas,
                                  weight_decay=cfg.train.weight_decay, fused=fused, foreach=not fused)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=round(cfg.train.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    # the scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it per process)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.log_with != "none":
        accelerator.init_trackers("tensorboard", config={k: v for k, v in _flat(cfg.model_dump()).items()
                                                         if isinstance(v, (int, float, str, bool))})

    compare = {}
    if class_task or any(x.candidates for x in test_set):
        compare["majority"] = majority_baseline([class_name(x, x.gold, class_task) for x in train_set if x.candidates],
                                                [class_name(x, x.gold, class_task) for x in test_set if x.candidates])
    if cfg.eval.before_training:
        compare["untrained"] = evaluate_and_report(model, accelerator, cfg, tokenizer, test_set, class_task,
                                                   out / "eval_untrained", "untrained", compare)

    # ---- the loop -----------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, disable=not accelerator.is_main_process, desc="training", dynamic_ncols=True)
    model.train()
    plan, plan_epoch = None, -1
    skipped_overflow, pad_slots, real_tokens = 0, 0, 0
    rank_report = {"rank": rank, "world_size": world, "examples_seen": 0, "first_step_ids": None}
    t_last, tokens_since = time.perf_counter(), 0
    for step in range(total_steps):
        epoch = step // steps_per_epoch
        if epoch != plan_epoch:
            plan = D.plan_global_batches(lengths, global_batch, cfg.seed, epoch, cfg.data.group_by_length)
            plan_epoch = epoch
        batch_ids = plan[step % steps_per_epoch]
        n_targets = sum(train_set[j].n_targets for j in batch_ids)  # same on every rank: no communication
        micro_batches = D.micro_batches_for_rank(batch_ids, lengths, cfg.train.micro_batch_size,
                                                 cfg.train.grad_accum, world, rank)
        step_nll, step_tokens, grad_norm = 0.0, 0, None
        rank_report["examples_seen"] += sum(len(m) for m in micro_batches)
        if rank_report["first_step_ids"] is None:
            rank_report["first_step_ids"] = [train_set[j].id for m in micro_batches for j in m]
        for micro in micro_batches:
            batch = {k: v.to(accelerator.device) for k, v in D.collate_train([train_set[j] for j in micro],
                                                                            tokenizer.pad_token_id).items()}
            pad_slots += batch["input_ids"].numel()
            real_tokens += int(batch["attention_mask"].sum())
            step_tokens += int(batch["attention_mask"].sum())
            with accelerator.accumulate(model):
                loss_sum, _ = nll_sum(model, batch)
                # x world x accum undoes DDP's mean over ranks and accelerate's / accum: the update is then
                # sum(NLL over the global batch) / (its target tokens), however the batch is split
                accelerator.backward(loss_sum * (world * cfg.train.grad_accum / n_targets))
                step_nll += loss_sum.item()
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
                optimizer.step()
                if accelerator.sync_gradients:
                    if accelerator.optimizer_step_was_skipped:
                        skipped_overflow += 1  # fp16 loss-scale overflow: no update, schedule waits
                    else:
                        scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        total_nll, total_tokens = sum_across_ranks(accelerator, [step_nll, step_tokens])
        tokens_since += total_tokens
        progress.update(1)
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps:
            now = time.perf_counter()
            row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), "loss": total_nll / n_targets,
                   "lr": scheduler.get_last_lr()[0],
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
                   "peak_mem_gib": peak_memory_gib(accelerator.device),
                   "padding_frac": 1 - real_tokens / max(1, pad_slots), "overflow_skipped": skipped_overflow}
            t_last, tokens_since = now, 0
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
                val = compute_metrics(build_predictions(
                    test_set[:cfg.train.val_examples],
                    run_evaluation(model, accelerator, test_set[:cfg.train.val_examples], tokenizer,
                                   cfg.eval.batch_size, 0, False, loss_only=True), class_task))
                row["val_loss"] = val["loss"]
            _write_log(accelerator, out, row)
            progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
    progress.close()
    if skipped_overflow:
        _log(accelerator, f"{skipped_overflow} steps skipped for fp16 overflow (loss scale lowered)")

    # ---- save and evaluate --------------------------------------------------------------------------------
    from accelerate.utils import gather_object

    ranks = gather_object([rank_report])  # which rows each rank trained on: proof the ranks are real
    if accelerator.is_main_process:
        (out / "ranks.json").write_text(json.dumps(ranks, indent=1))
    save_final(model, accelerator, tokenizer, out, config_yaml)
    metrics = evaluate_and_report(model, accelerator, cfg, tokenizer, test_set, class_task, out / "eval",
                                  "fine-tuned", compare)
    if accelerator.is_main_process:
        plot_loss_curve(out / "train_log.jsonl", out / "loss_curve.png")
        _log(accelerator, f"padding: {1 - real_tokens / max(1, pad_slots):.1%} of micro-batch slots were padding")
        _log(accelerator, f"held-out metrics ({len(test_set)} examples)\n"
             + metrics_table({**compare, "fine-tuned": metrics}))
        _log(accelerator, f"outputs in {out}/ (final/, eval/, config.yaml, train_log.jsonl, loss_curve.png)")
    accelerator.end_training()
    return metrics


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
