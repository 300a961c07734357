"""sft: supervised fine-tuning (full or LoRA) with PaddleNLP's Trainer.

Checkpoints go to ``ckpt_dir``, which is NOT the rule's output: Snakemake deletes the outputs of
a failed job, so a killed run would otherwise start over. A fingerprint of everything that
shapes training (params, data, base model) guards the checkpoints: a rerun resumes only a run
that was training the same thing, and a stale one is moved aside, not deleted.

``run_state.json`` beside them says whether their run finished (its output written): asking for
sft again after a finished run (``--forcerun sft``, or its output deleted) moves them aside the
same way and trains from scratch; after a crash the run resumes from its newest complete
checkpoint. The npu target applies the same rule before upstream's script starts
(``llamapipe.stages.collect.prepare_sft``): that script resumes from its output_dir by itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from llamapipe.core import checkpoint_io
from llamapipe.core.atomic import atomic_dir, write_json
from llamapipe.core.hashing import sha256_file, sha256_json
from llamapipe.core.tokenizer_io import encode_example, load_tokenizer
from llamapipe.stages.progress import PROGRESS_INTERVAL_S, Progress, plan_message

log = logging.getLogger("llamapipe.sft")

# Knobs that change what is trained; save/log cadence does not, so it may change across a resume.
CADENCE_KEYS = {"save_steps", "logging_steps", "save_total_limit"}

LORA_TARGET_MODULES = [  # PaddleNLP's LLaMA LoRA targets (llm/utils: get_lora_target_modules)
    ".*q_proj.*",
    ".*k_proj.*",
    ".*v_proj.*",
    ".*o_proj.*",
    ".*gate_proj.*",
    ".*up_proj.*",
    ".*down_proj.*",
]


def load_examples(path: str, tok: Any, src_length: int, max_length: int) -> list[dict[str, list[int]]]:
    with open(path, encoding="utf-8") as f:
        return [
            encode_example(tok, rec["src"], rec["tgt"], src_length, max_length)
            for rec in map(json.loads, f)
        ]


def training_identity(params: dict[str, Any], train_file: str, base_dir: str, seed: int) -> dict[str, str]:
    shaping = {k: v for k, v in params.items() if k not in CADENCE_KEYS}
    return {
        "params": sha256_json({"params": shaping, "seed": seed}),
        "train_data": sha256_file(train_file),
        "base_model": sha256_file(os.path.join(base_dir, "config.json")),
    }


def prepare_checkpoint_dir(ckpt_dir: Path, fp: dict[str, str], max_steps: int | None = None) -> None:
    """Set aside checkpoints of a different run, or (``max_steps`` given) of a finished one, and
    mark the run started (one process does this: rank 0)."""
    fp_file = ckpt_dir / "fingerprint.json"
    if ckpt_dir.exists():
        old = json.loads(fp_file.read_text()) if fp_file.exists() else None
        if old != fp:
            changed = sorted(k for k in fp if not old or old.get(k) != fp[k])
            aside = checkpoint_io.set_aside(ckpt_dir)
            log.warning("checkpoints in %s belong to another run (changed: %s); moved to %s",
                        ckpt_dir, ", ".join(changed) or "no fingerprint", aside)
        elif max_steps:
            checkpoint_io.set_aside_finished(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json(fp_file, fp)
    if max_steps:
        checkpoint_io.mark_started(ckpt_dir, max_steps)


def last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint (upstream's ``.checkpoint_done`` rule), or None."""
    os.environ.update(checkpoint_io.COMPLETE_CHECKPOINTS_ENV)
    from paddlenlp.trainer.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(ckpt_dir))


class LossLogWriter:
    """Trainer callback: one JSON line per log event, flushed at once so a user can tail it.

    PaddleNLP's Trainer empties ``state.log_history`` after each log, so this file is the
    record. It lives beside the checkpoints; on resume it is cut back to the resumed step.
    """

    def __init__(self, path: Path, resume_step: int, writer: bool = True):
        self.path, self.writer = path, writer  # writer: one process writes (rank 0 of several)
        if not writer:
            return
        kept = []
        if resume_step and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if json.loads(ln).get("step", 0) <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))

    def callback(self) -> Any:
        from paddlenlp.trainer import TrainerCallback

        writer = self

        class _Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if not writer.writer:
                    return
                entry = {"step": state.global_step}
                entry.update({k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))})
                with open(writer.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")

        return _Callback()

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines()]


class ProgressReporter:
    """Trainer callback: a progress line (step/total, loss, tokens/s, elapsed, time left) at the
    first logged step, then at most one per ``interval_s`` seconds, and at the last step, through
    our logger: the rule's log gets it, and its terminal filter shows it
    (``llamapipe.stages.progress``)."""

    def __init__(self, total: int, start_step: int, tokens_per_step: float, writer: bool = True,
                 interval_s: float = PROGRESS_INTERVAL_S):
        self.progress = Progress(total, interval_s)
        self.start_step, self.tokens_per_step, self.writer = start_step, tokens_per_step, writer
        self.loss: float | None = None

    def report(self, step: int, loss: float | None, force: bool = False) -> None:
        line = self.progress.update(step, loss, self.tokens_per_step, force=force)
        if line and self.writer:
            log.info(line)

    def callback(self) -> Any:
        from paddlenlp.trainer import TrainerCallback

        reporter = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                reporter.progress.begin(reporter.start_step)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    reporter.loss = logs["loss"]
                    reporter.report(state.global_step, reporter.loss)

            def on_train_end(self, args, state, control, **kwargs):
                # the last step, logged or not (logging_steps need not divide max_steps)
                reporter.report(state.global_step, reporter.loss, force=True)

        return _Callback()


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: a function of (seed, epoch) only, so a resumed run
    replays the same order without having replayed the RNG draws of the epochs it skipped."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:4], "little")


def resumable_trainer(seed: int) -> Any:
    """PaddleNLP's Trainer, with the two things a one-process run needs to resume exactly.

    - Data order: for one process the Trainer shuffles with ``paddle.io.BatchSampler``, whose
      order hangs on the global RNG at each epoch start; a resume that skips epochs gets another
      order. Paddle's ``DistributedBatchSampler`` (what the Trainer uses on several cards) takes
      its order from ``set_epoch``, which the Trainer calls every epoch: seeded per epoch here.
    - ``save_total_limit``: the Trainer rotates only when ``local_rank == 0``, i.e. under
      ``paddle.distributed.launch``; a plain process has ``local_rank == -1`` and kept every
      checkpoint. Pruned here after the save is marked complete, by step number.
    """
    from paddle.io import DistributedBatchSampler
    from paddlenlp.trainer import Trainer

    class EpochSeededSampler(DistributedBatchSampler):
        def set_epoch(self, epoch=0):
            super().set_epoch(epoch_seed(seed, epoch))

    class ResumableTrainer(Trainer):
        def _get_train_sampler(self):
            # Several processes (sft.processes): the same sampler over the data-parallel ranks. Its
            # permutation does not depend on the rank count (the dataset padded to a multiple of
            # it, then shuffled: identical when that needs no padding), and rank r takes the r-th
            # slice of each global batch: N processes at batch b/N see one process's batches of b.
            return EpochSeededSampler(
                self.train_dataset, batch_size=self.args.per_device_train_batch_size, shuffle=True,
                num_replicas=self.args.world_size, rank=self.args.process_index,
                drop_last=self.args.dataloader_drop_last,
            )

        def _save_checkpoint(self, model, metrics=None):
            super()._save_checkpoint(model, metrics=metrics)
            if self.args.local_rank == -1 and self.args.save_total_limit:
                checkpoint_io.prune_checkpoints(self.args.output_dir, self.args.save_total_limit)

    return ResumableTrainer


def _barrier(args: Any) -> None:
    if args.world_size > 1:
        import paddle.distributed as dist

        dist.barrier()


def build_model(base_dir: str, params: dict[str, Any], dtype: str) -> Any:
    from paddlenlp.transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    if not params["lora"]:
        return model
    from paddlenlp.peft import LoRAConfig, LoRAModel

    lora_config = LoRAConfig(
        target_modules=LORA_TARGET_MODULES,
        r=params["lora_rank"],
        lora_alpha=2 * params["lora_rank"],  # upstream run_finetune.py's rule: there is no alpha knob
        dtype=dtype,
        base_model_name_or_path=base_dir,
    )
    model = LoRAModel(model, lora_config)
    model.mark_only_lora_as_trainable()
    return model


def training_arguments(params: dict[str, Any], ckpt_dir: str, seed: int, device: str = "cpu") -> dict[str, Any]:
    """The Trainer's arguments from the sft section (names as in run_finetune.py)."""
    return dict(
        output_dir=ckpt_dir,
        device=device,
        seed=seed,
        max_steps=params["max_steps"],
        per_device_train_batch_size=params["per_device_train_batch_size"],
        gradient_accumulation_steps=params["gradient_accumulation_steps"],
        learning_rate=params["learning_rate"],
        warmup_steps=params["warmup_steps"],
        weight_decay=params["weight_decay"],
        lr_scheduler_type="linear",
        logging_steps=params["logging_steps"],
        save_steps=params["save_steps"],
        save_total_limit=params["save_total_limit"],
        bf16=params["dtype"] == "bfloat16",
        fp16=params["dtype"] == "float16",
        disable_tqdm=True,
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def run(
    params: dict[str, Any],
    train_file: str,
    base_dir: str,
    out_dir: str,
    ckpt_dir: str,
    seed: int,
    device: str = "cpu",
) -> dict[str, Any] | None:
    from paddlenlp.data import DataCollatorForSeq2Seq
    from paddlenlp.datasets import MapDataset
    from paddlenlp.trainer import TrainingArguments

    from llamapipe.core.paddle_env import seed_everything

    seed_everything(seed)
    tok = load_tokenizer(base_dir)
    examples = load_examples(train_file, tok, params["src_length"], params["max_length"])
    # under paddle.distributed.launch (sft.processes > 1) this joins the process group
    args = TrainingArguments(**training_arguments(params, ckpt_dir, seed, device))
    first = args.process_index == 0
    if first:
        prepare_checkpoint_dir(Path(ckpt_dir), training_identity(params, train_file, base_dir, seed),
                               params["max_steps"])
    _barrier(args)  # every rank resumes from what rank 0 left in place
    resume = last_checkpoint(Path(ckpt_dir))

    resume_step = int(Path(resume).name.split("-")[-1]) if resume else 0
    if first:
        log.info(plan_message(resume_step, params["max_steps"]))
    loss_log = LossLogWriter(Path(ckpt_dir) / "train_log.jsonl", resume_step, writer=first)
    tokens_per_step = sum(len(e["input_ids"]) for e in examples) / len(examples) * (
        params["per_device_train_batch_size"] * params["gradient_accumulation_steps"] * args.world_size
    )
    progress = ProgressReporter(params["max_steps"], resume_step, tokens_per_step, writer=first)
    model = build_model(base_dir, params, params["dtype"])
    collator = DataCollatorForSeq2Seq(tokenizer=tok, padding=True, label_pad_token_id=-100, return_tensors="np")
    trainer = resumable_trainer(seed)(
        model=model,
        args=args,
        train_dataset=MapDataset(examples),
        tokenizer=tok,
        data_collator=collator,
        callbacks=[loss_log.callback(), progress.callback()],
    )
    started = time.time()
    if resume_step >= params["max_steps"]:
        # nothing left to train (a finished run's checkpoints from before run_state.json): the
        # Trainer would still run one step past max_steps (resuming inside the last epoch, it
        # checks the limit only after a step), so the final checkpoint's weights are loaded as is
        trainer._load_from_checkpoint(resume)
        trainer.state.global_step, train_loss = resume_step, None
    else:
        train_loss = trainer.train(resume_from_checkpoint=resume).training_loss
    elapsed = time.time() - started

    _barrier(args)
    if not first:  # rank 0 writes the output (and the manifest: cli skips it on other ranks)
        return None
    history = loss_log.entries()
    losses = [h for h in history if "loss" in h]
    steps_run = trainer.state.global_step - resume_step
    summary = {
        "mode": "lora" if params["lora"] else "full",
        "global_step": trainer.state.global_step,
        "resumed_from": resume,
        "steps_this_run": steps_run,
        "first_loss": losses[0]["loss"] if losses else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "train_seconds_this_run": round(elapsed, 3),
        "tokens_per_second": round(tokens_per_step * steps_run / elapsed, 1) if elapsed > 0 else None,
        "train_loss": train_loss,
        "examples": len(examples),
        "processes": args.world_size,
    }
    with atomic_dir(out_dir) as tmp:
        trainer.save_model(str(tmp))
        tok.save_pretrained(str(tmp))
        shutil.copyfile(loss_log.path, tmp / "train_log.jsonl")
        write_json(tmp / "train_summary.json", summary)
    checkpoint_io.mark_completed(Path(ckpt_dir), trainer.state.global_step)
    log.info("sft done: step %s, loss %s -> %s", summary["global_step"], summary["first_loss"], summary["final_loss"])
    return summary
