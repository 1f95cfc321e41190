"""Fine-tune: ``preprocess`` (data, base model, resume point) -> ``forward`` (the Trainer run) -> ``postprocess``
(save, upload, register the new model).

Unlike the batched handlers a fine-tune owns its device for hours, one job at a time, so it runs on
the training runner (:mod:`workers.training.runner`) instead of an engine. ``full`` trains every
weight; ``lora`` trains a PEFT adapter over the frozen base; ``qlora`` does the same over a 4-bit
(bitsandbytes nf4) base. The result is written to ``models/ftm-...`` in storage and registered as
``ft:{base}:{suffix}:{id}`` on the serving queue.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    BitsAndBytesConfig,
    PrinterCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)

from queueformer.contract.errors import Cancelled, DeadlineExceeded, TransientError, UnsupportedOnHardware
from queueformer.contract.jobs import FineTuneJob, FineTuneMethod, Task
from queueformer.contract.records import FineTuneResult
from queueformer.contract.registry import ModelEntry, Quantization, Registry
from queueformer.server.checkpoints import Checkpoints
from queueformer.server.files import TrainingData
from queueformer.server.jobs import JobStore
from queueformer.server.overlay import ModelOverlay, fine_tuned_name
from queueformer.server.storage import Storage
from workers.loading import auto_class, load_kwargs
from workers.training.callbacks import JobCallback
from workers.training.data import Blocks, pack, read_texts, split

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything a run needs, prepared on the CPU."""

    job_id: str
    spec: FineTuneJob
    tenant: str | None
    base: ModelEntry
    tokenizer: Any
    train: Blocks
    eval: Blocks | None
    work_dir: Path
    checkpoints: Checkpoints
    resume: tuple[int, Path] | None
    stop_reason: Callable[[], str | None]


@dataclass
class Run:
    model: Any
    steps: int
    stopped: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[int] = field(default_factory=list)


class FineTuneHandler:
    """Trains registered generate models on this worker's device.

    The same three steps as every handler, but on one job at a time and for hours: ``preprocess``
    (data, base model, resume point), ``forward`` (the Trainer run) and ``postprocess`` (upload and
    register). It runs on the training runner, not an engine, so it is not a ``Handler`` subclass.
    """

    task = Task.FINE_TUNE

    def __init__(
        self,
        registry: Registry,
        models_dir: Path,
        storage: Storage,
        jobs: JobStore,
        overlay: ModelOverlay,
        work_root: Path,
        training: TrainingData,
    ) -> None:
        self.registry = registry
        self.models_dir = models_dir
        self.storage = storage
        self.jobs = jobs
        self.overlay = overlay
        self.work_root = work_root
        self.training = training

    # --- preprocess ---------------------------------------------------------------------------

    def preprocess(
        self, job_id: str, spec: FineTuneJob, tenant: str | None, stop_reason: Callable[[], str | None]
    ) -> Plan:
        base = self.registry.get(spec.model, spec.task)
        # Checked again here, not only by the API: a job record is data in Redis, and the file must
        # still belong to the job's tenant (or lie under an allowed prefix) when it is read.
        with self.training.open(spec.training_file, tenant or "") as fh:
            texts = read_texts(fh)
        source, kwargs = load_kwargs(base, self.models_dir)
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=base.revision, local_files_only=kwargs["local_files_only"]
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        hp = spec.hyperparameters
        blocks = pack(tokenizer, texts, hp.block_size)
        train, held = split(blocks, hp.eval_split, hp.seed)
        work_dir = self.work_root / job_id
        work_dir.mkdir(parents=True, exist_ok=True)
        checkpoints = Checkpoints(self.storage, job_id)
        return Plan(
            job_id=job_id,
            spec=spec,
            tenant=tenant,
            base=base,
            tokenizer=tokenizer,
            train=Blocks(train),
            eval=Blocks(held) if held else None,
            work_dir=work_dir,
            checkpoints=checkpoints,
            resume=checkpoints.restore_latest(work_dir),
            stop_reason=stop_reason,
        )

    # --- forward ------------------------------------------------------------------------------

    def forward(self, plan: Plan) -> Run:
        hp = plan.spec.hyperparameters
        set_seed(hp.seed)  # before the model exists: LoRA's initial weights come from this seed
        model = self.build_model(plan)
        cuda = torch.cuda.is_available()
        args = TrainingArguments(
            output_dir=str(plan.work_dir),
            max_steps=hp.max_steps or -1,
            num_train_epochs=hp.epochs or 1.0,
            per_device_train_batch_size=hp.batch_size,
            per_device_eval_batch_size=hp.batch_size,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            learning_rate=hp.learning_rate,
            warmup_steps=hp.warmup_steps,
            weight_decay=hp.weight_decay,
            seed=hp.seed,
            data_seed=hp.seed,
            logging_steps=min(10, max(1, hp.checkpoint_steps // 5)),  # progress events at least every 10 steps
            save_strategy="steps",
            save_steps=hp.checkpoint_steps,
            save_total_limit=1,  # older ones live in storage; the local copy only feeds the upload
            eval_strategy="steps" if plan.eval else "no",
            eval_steps=hp.checkpoint_steps,
            report_to="none",
            disable_tqdm=True,
            use_cpu=not cuda,
            bf16=cuda and torch.cuda.is_bf16_supported(),  # mixed precision; full keeps fp32 master weights
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        callback = JobCallback(
            plan.job_id,
            self.jobs,
            plan.checkpoints,
            plan.stop_reason,
            plan.resume[0] if plan.resume else None,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=plan.train, eval_dataset=plan.eval, callbacks=[callback]
        )
        trainer.remove_callback(PrinterCallback)  # progress goes to the job's events, not stdout
        if plan.resume:
            self.jobs.emit(plan.job_id, "resumed", {"step": plan.resume[0]})
        trainer.train(resume_from_checkpoint=str(plan.resume[1]) if plan.resume else None)
        state = trainer.state
        metrics = dict(callback.last)
        if callback.stopped is None and plan.eval is not None:
            eval_loss = float(trainer.evaluate()["eval_loss"])
            metrics.update(eval_loss=round(eval_loss, 6), perplexity=round(math.exp(min(eval_loss, 700.0)), 4))
        progress = {**callback.progress(state), **metrics}
        self.jobs.set_progress(plan.job_id, progress)
        return Run(
            trainer.model, state.global_step, callback.stopped, metrics, checkpoints=callback.saved, progress=progress
        )

    def build_model(self, plan: Plan) -> Any:
        method = plan.spec.method
        base = plan.base
        source, kwargs = load_kwargs(base, self.models_dir)
        kwargs.pop("quantization_config", None)
        kwargs["device_map"] = None  # the Trainer places the model on its device
        if method == FineTuneMethod.FULL:
            kwargs["dtype"] = torch.float32  # full training keeps fp32 master weights (bf16 autocast on GPUs)
        if method == FineTuneMethod.QLORA:
            compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=Quantization.NF4.value,
                bnb_4bit_compute_dtype=compute,
                bnb_4bit_use_double_quant=True,
            )
            kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else "cpu"
        try:
            model = auto_class(Task.FINE_TUNE).from_pretrained(source, **kwargs)
        except Exception as exc:
            if method == FineTuneMethod.QLORA:
                raise UnsupportedOnHardware(
                    f"QLoRA needs bitsandbytes 4-bit on this worker's device, which failed: {exc}", param="method"
                ) from exc
            raise
        if method == FineTuneMethod.FULL:
            return model
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == FineTuneMethod.QLORA:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        hp = plan.spec.hyperparameters
        config = LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=hp.lora_target_modules,  # None: peft's default for the architecture
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    # --- postprocess --------------------------------------------------------------------------

    def postprocess(self, plan: Plan, run: Run) -> FineTuneResult:
        if run.stopped == "cancelled":
            raise Cancelled(f"cancelled at step {run.steps}; checkpoint kept", details=self._kept(run))
        if run.stopped == "deadline":
            raise DeadlineExceeded(f"deadline passed at step {run.steps}; checkpoint kept", details=self._kept(run))
        if run.stopped == "draining":
            raise TransientError(f"worker is shutting down; the job resumes from step {run.steps}")
        adapter = plan.spec.method != FineTuneMethod.FULL
        out = plan.work_dir / "final"
        shutil.rmtree(out, ignore_errors=True)
        run.model.save_pretrained(out)  # a PEFT model saves only its adapter
        plan.tokenizer.save_pretrained(out)
        model_id = f"ftm-{plan.job_id.split('-', 1)[1]}"
        name = fine_tuned_name(plan.base.name, plan.spec.suffix, plan.job_id)
        uri = self.storage.put_dir(
            out,
            self.storage.model_key(model_id),
            {"name": name, "base_model": plan.base.name, "method": plan.spec.method.value, "saved_at": time.time()},
        )
        self.overlay.add(
            ModelEntry(
                name=name,
                task=plan.base.task,
                path=uri,
                queue=self.registry.fine_tune.serve_queue,
                dtype=plan.base.dtype,
                device_map=plan.base.device_map,
                max_batch_size=plan.base.max_batch_size,
                max_batch_tokens=plan.base.max_batch_tokens,
                max_input_tokens=plan.base.max_input_tokens,
                kv_cache_tokens=plan.base.kv_cache_tokens,
                base_model=plan.base.name,
                adapter=adapter,
                tenant=plan.tenant,
            )
        )
        shutil.rmtree(plan.work_dir, ignore_errors=True)
        trained_tokens = self._trained_tokens(plan, run)
        # On the record too, so job listings show the new model without reading each result from storage.
        self.jobs.set_progress(
            plan.job_id, {**run.progress, "fine_tuned_model": name, "trained_tokens": trained_tokens}
        )
        return FineTuneResult(
            model=plan.base.name,
            fine_tuned_model=name,
            method=plan.spec.method.value,
            steps=run.steps,
            train_loss=run.metrics.get("loss"),
            eval_loss=run.metrics.get("eval_loss"),
            perplexity=run.metrics.get("perplexity"),
            resumed_from_step=plan.resume[0] if plan.resume else None,
            trained_tokens=trained_tokens,
            checkpoints=[*run.checkpoints],
        )

    def _trained_tokens(self, plan: Plan, run: Run) -> int:
        """Tokens through the optimizer: steps x sequences per step x block length (a partial last batch aside)."""
        hp = plan.spec.hyperparameters
        return run.steps * hp.batch_size * hp.gradient_accumulation_steps * len(plan.train.blocks[0])

    def _kept(self, run: Run) -> dict[str, Any]:
        return {"step": run.steps, "checkpoints": run.checkpoints}
