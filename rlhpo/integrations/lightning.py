"""A saved policy tuning a Lightning 2.x run (``pip install 'rlhpo[lightning]'``).

    from rlhpo.integrations.lightning import RLHPOCallback

    trainer = L.Trainer(max_epochs=20, callbacks=[RLHPOCallback("default",
                                                                n_classes=10)])
    trainer.fit(module, DataLoader(train_set, batch_size=16, shuffle=True), val_loader)

The module logs ``val_loss`` and ``val_accuracy`` (or ``val_r2``) in its
``validation_step``; the callback reads them after each validation run, together
with the mean training loss it collects from ``training_step``'s outputs, and
applies the policy's decision:

- **learning rate**: the first optimizer's param groups and its LR scheduler's
  ``base_lrs`` (so the change survives the scheduler's next step);
- **dropout**: ``p`` of every dropout module of the LightningModule;
- **batch size**: ``trainer.accumulate_grad_batches`` = batch / the loader's
  batch size (the micro-batch; use the smallest batch you allow). Lightning reads
  it at every batch and divides the loss by it, as its own
  ``GradientAccumulationScheduler`` relies on; a change waits until the batches
  counted in the epoch are a multiple of the new value, so no step mixes two.

Samples are counted by the callback; training stops when ``budget_samples`` are
used (default: ``max_epochs`` x the training set). The applied hyperparameters
(``hp/lr``, ``hp/batch_size``, ``hp/dropout``, ``hp/rollback``, ``hp/accumulation``)
go to every logger of the trainer (``trainer.loggers``: W&B, CSV, TensorBoard, ...),
on the same step as the validation metrics they answer.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from rlhpo.integrations import GradientAccumulation, require

pl = require("lightning.pytorch", "pip install 'rlhpo[lightning]'", "rlhpo.integrations.lightning")

log = logging.getLogger("rlhpo.integrations.lightning")


class RLHPOCallback(pl.Callback):
    """Lets a saved rlhpo policy tune lr, batch size and dropout of a Lightning run.

    Args:
        policy_dir: a policy directory (``manifest.json`` + ``policy.safetensors``).
        n_classes: classes (accuracy only; normalises the score).
        metric: ``"accuracy"`` or ``"r2"``; ``score_key`` defaults to ``val_<metric>``.
        budget_samples: training samples of the whole run (default: max_epochs x
            training set, or max_steps x starting batch).
        batch_size: starting effective batch (default: the loader's batch size x
            ``accumulate_grad_batches``).
        loss_key / score_key: names the module logs in ``validation_step``.
        **controller_kwargs: passed to :class:`rlhpo.controller.Controller`.
    """

    def __init__(
        self,
        policy_dir: str | os.PathLike[str],
        *,
        n_classes: int = 0,
        metric: str = "accuracy",
        budget_samples: int | None = None,
        batch_size: int | None = None,
        loss_key: str = "val_loss",
        score_key: str | None = None,
        **controller_kwargs: Any,
    ):
        from rlhpo.policy import load_policy

        if metric not in ("accuracy", "r2"):
            raise ValueError(f"metric must be accuracy or r2, got {metric!r}")
        if metric == "accuracy" and n_classes < 2:
            raise ValueError(
                f"metric 'accuracy' needs n_classes >= 2 (to normalise the score), got {n_classes!r}"
            )
        self.policy = load_policy(policy_dir)  # fail now, not after the first epoch
        self.n_classes = n_classes
        self.metric = metric
        self.budget_samples = budget_samples
        self.start_batch_size = batch_size
        self.loss_key = loss_key
        self.score_key = score_key or f"val_{metric}"
        self.controller_kwargs = controller_kwargs
        self.controller = None
        self.decisions: list[Any] = []
        self.samples = 0
        self._accum: GradientAccumulation | None = None
        self._loss_sum = 0.0
        self._loss_n = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from rlhpo.controller import Controller

        loader = trainer.train_dataloader
        micro = getattr(loader, "batch_size", None)
        if not isinstance(micro, int) or micro < 1:
            raise ValueError(
                "RLHPOCallback needs one training DataLoader with an int batch_size (the "
                f"micro-batch); got {type(loader).__name__} with batch_size {micro!r}"
            )
        dataset = getattr(loader, "dataset", None)
        n_train = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        if n_train is not None and math.isfinite(trainer.num_training_batches):
            n_train = min(n_train, int(trainer.num_training_batches) * micro)
        start = self.start_batch_size or micro * int(trainer.accumulate_grad_batches)
        budget = self.budget_samples
        if budget is None:
            if trainer.max_epochs is not None and trainer.max_epochs > 0 and n_train:
                budget = int(trainer.max_epochs) * n_train
            elif trainer.max_steps and trainer.max_steps > 0:
                budget = int(trainer.max_steps) * start
            else:
                raise ValueError(
                    "RLHPOCallback: cannot tell the run's sample budget (set max_epochs with a "
                    "sized training set, or max_steps); pass budget_samples="
                )
        scheduler = (
            trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        )
        self._accum = GradientAccumulation(micro)
        self.samples, self.decisions = 0, []
        self._loss_sum, self._loss_n = 0.0, 0
        self.controller = Controller(
            self.policy,
            optimizer=trainer.optimizers[0],
            model=pl_module,
            scheduler=scheduler,
            budget_samples=int(budget),
            metric=self.metric,
            n_classes=self.n_classes,
            batch_size=start,
            set_batch_size=self._accum.request,
            **self.controller_kwargs,
        )
        self._set_steps(trainer, self._accum.ready())

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._accum is not None:
            self._set_steps(trainer, self._accum.epoch_start())

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._accum is None:
            return
        n = _batch_len(batch) or self._accum.micro_batch
        self.samples += n
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            # Lightning hands over the loss divided by the accumulation: undo that.
            lv = float(loss) * trainer.accumulate_grad_batches
            self._loss_sum += lv * n
            self._loss_n += n
            self.controller.observe_loss(lv)
        self._set_steps(trainer, self._accum.micro_batch_done())
        if self.samples >= self.controller.budget_samples:
            trainer.should_stop = True

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        ctl = self.controller
        if trainer.sanity_checking or ctl is None or ctl.done:
            return
        metrics = trainer.callback_metrics
        for key in (self.loss_key, self.score_key):
            if key not in metrics:
                raise KeyError(
                    f"RLHPOCallback: the logged metrics have no {key!r} (got "
                    f"{', '.join(sorted(metrics))}); self.log({key!r}, ...) in validation_step, "
                    "or pass loss_key=/score_key="
                )
        val_loss, val_score = float(metrics[self.loss_key]), float(metrics[self.score_key])
        if self.samples == 0 and not ctl.history.records:
            d = ctl.start(val_loss=val_loss, val_score=val_score)
        else:
            train_loss = self._loss_sum / self._loss_n if self._loss_n else None
            d = ctl.step(
                train_loss=train_loss, val_loss=val_loss, val_score=val_score, samples=self.samples
            )
        self._loss_sum, self._loss_n = 0.0, 0
        self._set_steps(trainer, self._accum.ready())
        self.decisions.append(d)
        if d.done:
            trainer.should_stop = True
        logs = {
            **d.as_log(),
            "hp/accumulation": float(self._accum.batch_size // self._accum.micro_batch),
        }
        # Lightning logs the validation metrics at the count of batches that stepped,
        # which is one behind global_step when validation runs inside an epoch's last
        # step; the same step puts hp/* beside val_* in every logger.
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(logs, step=int(step))
        log.info(
            "rlhpo: epoch %d, %d samples: lr %.3g, batch %d, dropout %.2f%s",
            trainer.current_epoch,
            self.samples,
            d.lr,
            d.batch_size,
            d.dropout,
            " (rolled back)" if d.rolled_back else "",
        )

    @staticmethod
    def _set_steps(trainer: Any, steps: int | None) -> None:
        if steps is not None:
            trainer.accumulate_grad_batches = int(steps)


def _batch_len(batch: Any) -> int | None:
    """Samples in a batch: the first dimension of its first tensor."""
    import torch

    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for b in batch:
            n = _batch_len(b)
            if n is not None:
                return n
    return None
