"""A saved policy tuning a Hugging Face ``transformers.Trainer`` run.

    from rlhpo.integrations.hf import RLHPOCallback

    args = TrainingArguments(..., per_device_train_batch_size=16,  # the smallest batch
                             eval_strategy="epoch", logging_strategy="epoch")
    trainer = Trainer(model=model, args=args, train_dataset=..., eval_dataset=...,
                      compute_metrics=accuracy)      # must return {"accuracy": ...}
    RLHPOCallback("default", batch_size=64).attach(trainer)
    trainer.train()

At each evaluation during training the callback reports ``eval_loss``, the
evaluation score (``eval_accuracy`` or ``eval_r2``) and the training loss logged
since the last one, and applies the policy's decision:

- **learning rate**: every param group. The policy owns the lr, so the callback
  takes over the Trainer's LR scheduler when training starts: its factor becomes
  a constant 1 (warm-up and decay of ``lr_scheduler_type`` no longer apply) and
  the optimizer uses exactly the lr the policy chose at every step. The
  Trainer sizes its schedule for accumulation 1 (see below), so left alone a
  linear schedule would keep scaling the policy's lr down by a factor the policy
  never sees (0.744x at the end of a run whose batch the policy had raised);
- **dropout**: ``p`` of every dropout module and the model config's dropout fields;
- **batch size**: ``args.gradient_accumulation_steps`` = batch / micro-batch,
  where the micro-batch is ``per_device_train_batch_size`` (x processes).

How the batch size works, checked against transformers 5.24's ``trainer.py``:
the Trainer reads ``args.gradient_accumulation_steps`` at every optimizer step
(how many micro-batches to fetch, when to step), but fixes the number of
optimizer steps per epoch, ``max_steps`` and the LR schedule's length when
``train()`` starts. Started with accumulation above 1, a later decrease would end
each epoch early (its remaining batches skipped) and stop the run at ``max_steps``
before the data is used (measured with 15 micro-batches per epoch: started at 4
then set to 1, epochs ran 4 micro-batches and training stopped at max_steps in
epoch 3.4; started at 1 then set to 2, 4, 1, every epoch ran its 15 micro-batches
in 8, 4 and 15 optimizer steps). So the callback starts the Trainer at accumulation 1,
the most steps any batch size can take, and sets the starting batch from
``batch_size`` (or from the accumulation you configured, which it moves into
``batch_size`` in :meth:`attach`). Consequences: every epoch uses all its
data whatever the policy does, and a linear or cosine schedule is sized for
accumulation 1, so it would not reach its end when batches are larger: one more
reason why the callback replaces the schedule by the policy's lr.
Samples are counted by the callback; training stops when ``budget_samples`` are
used (default: the Trainer's epochs x the training set).

The loss under accumulation: the Trainer skips its ``/ accumulation`` division
when a model's ``forward`` takes ``**kwargs`` (it then assumes the model divides
by ``num_items_in_batch``). Many classification heads, BERT's among them, take
``**kwargs`` but ignore it, so their loss and gradients grow with the
accumulation (transformers issue #47688). :meth:`attach` checks this with two
no-grad forward passes on two training samples and, for such a model, sets
``trainer.model_accepts_loss_kwargs = False``, the fix transformers documents.

Use it through :meth:`RLHPOCallback.attach`: it needs the Trainer to do that
check and to log the applied hyperparameters (``hp/lr``, ``hp/batch_size``,
``hp/dropout``, ``hp/rollback``, ``hp/accumulation``) through ``trainer.log``, so
they reach every logger the Trainer reports to (W&B, TensorBoard, ...).

In W&B, the Trainer's ``WandbCallback`` prefixes every logged key that is not an
evaluation metric with ``train/``, so these appear as ``train/hp/lr``,
``train/hp/batch_size``, ... on the ``train/global_step`` axis (the same values as
``hp/*`` in ``trainer.state.log_history``). Because the Trainer itself runs at
accumulation 1, the callback also corrects the W&B run's config when training
starts: ``gradient_accumulation_steps`` becomes the real starting accumulation and
``rlhpo/effective_batch_size`` the real starting batch (later changes are in
``train/hp/batch_size`` and ``train/hp/accumulation``).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from rlhpo.integrations import GradientAccumulation, require

_tf = require(
    "transformers",
    "pip install 'transformers>=4.45,<6' 'accelerate>=1.0,<2'",
    "rlhpo.integrations.hf",
)
TrainerCallback = _tf.TrainerCallback

log = logging.getLogger("rlhpo.integrations.hf")


class RLHPOCallback(TrainerCallback):
    """Lets a saved rlhpo policy tune lr, batch size and dropout of a ``Trainer`` run.

    Args:
        policy_dir: a policy directory (``manifest.json`` + ``policy.safetensors``).
        budget_samples: training samples of the whole run (default: epochs x
            training set, or ``max_steps`` x starting batch).
        batch_size: starting effective batch size (default: micro-batch x the
            accumulation in ``TrainingArguments`` when :meth:`attach` runs).
        metric: ``"accuracy"`` or ``"r2"``; ``score_key`` defaults to ``eval_<metric>``.
        n_classes: classes for accuracy (default: ``model.config.num_labels``).
        loss_key / score_key: keys of the evaluation metrics to read.
        **controller_kwargs: passed to :class:`rlhpo.controller.Controller`
            (``space``, ``freeze``, ``deterministic``, ``rollback``, ...).
    """

    def __init__(
        self,
        policy_dir: str | os.PathLike[str],
        *,
        budget_samples: int | None = None,
        batch_size: int | None = None,
        metric: str = "accuracy",
        n_classes: int | None = None,
        loss_key: str = "eval_loss",
        score_key: str | None = None,
        **controller_kwargs: Any,
    ):
        from rlhpo.policy import load_policy

        if metric not in ("accuracy", "r2"):
            raise ValueError(f"metric must be accuracy or r2, got {metric!r}")
        self.policy = load_policy(policy_dir)  # fail now, not after the first epoch
        self.budget_samples = budget_samples
        self.start_batch_size = batch_size
        self.metric = metric
        self.n_classes = n_classes
        self.loss_key = loss_key
        self.score_key = score_key or f"eval_{metric}"
        self.controller_kwargs = controller_kwargs
        self.controller = None
        self.decisions: list[Any] = []
        self.samples = 0
        self._trainer = None
        self._accum: GradientAccumulation | None = None
        self._losses: list[float] = []
        self._training = False
        self._n_epoch: int | None = None
        self._seen_in_epoch = 0

    # -- wiring ------------------------------------------------------------
    def attach(self, trainer: Any) -> Any:
        """Add this callback to ``trainer`` (the way to use it). Returns the trainer.

        Moves a configured gradient accumulation into the starting batch size,
        fixes the loss scale of models that ignore ``num_items_in_batch``, and
        keeps the trainer to log through ``trainer.log``.
        """
        args = trainer.args
        if args.gradient_accumulation_steps > 1:
            if self.start_batch_size is None:
                self.start_batch_size = self._micro_batch(args) * args.gradient_accumulation_steps
            log.info(
                "RLHPOCallback: gradient_accumulation_steps %d -> 1 so that the Trainer sizes "
                "its epochs for the smallest batch; the run starts at batch %d",
                args.gradient_accumulation_steps,
                self.start_batch_size,
            )
            args.gradient_accumulation_steps = 1
        if (
            trainer.model_accepts_loss_kwargs
            and trainer.compute_loss_func is None
            and trainer.loss_is_scaled_for_ga is None
        ):
            ignores = _loss_ignores_num_items(trainer)
            if ignores:
                trainer.model_accepts_loss_kwargs = False
                log.info(
                    "RLHPOCallback: %s ignores num_items_in_batch; set "
                    "trainer.model_accepts_loss_kwargs = False so the Trainer divides the loss "
                    "by the accumulation",
                    type(trainer.model).__name__,
                )
            elif ignores is None:
                log.warning(
                    "RLHPOCallback: could not check whether the model's loss uses "
                    "num_items_in_batch; if it does not, set trainer.model_accepts_loss_kwargs "
                    "= False, or its loss grows with the batch size"
                )
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        return trainer

    @staticmethod
    def _micro_batch(args: Any) -> int:
        return int(args.train_batch_size) * int(args.world_size)

    # -- Trainer events ----------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from rlhpo.controller import Controller

        if self._trainer is None:
            raise ValueError(
                "RLHPOCallback must be added with RLHPOCallback(...).attach(trainer): it needs "
                "the Trainer to log the hyperparameters it applies and to check the loss scale "
                "under gradient accumulation"
            )
        if args.gradient_accumulation_steps != 1:
            raise ValueError(
                "RLHPOCallback needs gradient_accumulation_steps == 1 when train() starts "
                f"(got {args.gradient_accumulation_steps}): transformers fixes the steps per "
                "epoch then, and a later decrease would skip data; set the starting batch "
                "with RLHPOCallback(batch_size=...) or attach(trainer) after setting it"
            )
        micro = self._micro_batch(args)
        dl = kwargs.get("train_dataloader")
        dataset = getattr(dl, "dataset", None)
        self._n_epoch = (
            len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        )
        start = self.start_batch_size or micro
        budget = self.budget_samples
        if budget is None:
            if args.max_steps and args.max_steps > 0:
                budget = int(args.max_steps) * start
            elif self._n_epoch is not None:
                budget = math.ceil(args.num_train_epochs * self._n_epoch)
            else:
                raise ValueError(
                    "RLHPOCallback: cannot tell the run's sample budget (the training set has "
                    "no length and max_steps is not set); pass budget_samples="
                )
        n_classes = self.n_classes
        if n_classes is None and self.metric == "accuracy":
            n_classes = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
        scheduler = kwargs.get("lr_scheduler")
        if scheduler is not None and not hasattr(scheduler, "base_lrs"):
            scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
        if scheduler is not None and optimizer is not None:
            _hold_schedule(scheduler, optimizer, args.lr_scheduler_type)
        self._accum = GradientAccumulation(micro)
        self.samples, self._losses, self._seen_in_epoch = 0, [], 0
        self.decisions = []
        kwargs = dict(self.controller_kwargs)
        eval_set = getattr(getattr(self, "_trainer", None), "eval_dataset", None)
        if "n_val" not in kwargs and hasattr(eval_set, "__len__"):
            kwargs["n_val"] = len(eval_set)  # scales the collapse guard's noise
        self.controller = Controller(
            self.policy,
            optimizer=optimizer,
            model=model,
            scheduler=scheduler,
            budget_samples=int(budget),
            metric=self.metric,
            n_classes=n_classes or 0,
            batch_size=start,
            set_batch_size=self._accum.request,
            **kwargs,
        )
        self._set_steps(args, self._accum.ready())
        self._training = True
        _wandb_config(
            {
                "gradient_accumulation_steps": self._accum.batch_size // micro,
                "rlhpo/effective_batch_size": self._accum.batch_size,
                "rlhpo/micro_batch": micro,
                "rlhpo/budget_samples": int(budget),
            }
        )

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self._accum is not None:
            self._seen_in_epoch = 0
            self._set_steps(args, self._accum.epoch_start())

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro_batch_done(args, control)

    def on_step_end(self, args, state, control, **kwargs):
        self._micro_batch_done(args, control)

    def _micro_batch_done(self, args, control) -> None:
        if self._accum is None:
            return
        take = self._accum.micro_batch
        if self._n_epoch is not None:
            # The last batch of an epoch is partial: count the samples it really has.
            take = max(0, min(take, self._n_epoch - self._seen_in_epoch))
        self._seen_in_epoch += take
        self.samples += take
        self._set_steps(args, self._accum.micro_batch_done())
        if self.samples >= self.controller.budget_samples:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Training logs (not evaluation or our own): the mean loss since the last log.
        if self._training and logs and "loss" in logs:
            self._losses.append(float(logs["loss"]))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        ctl = self.controller
        if not self._training or ctl is None or ctl.done:
            return
        metrics = metrics or {}
        for key in (self.loss_key, self.score_key):
            if key not in metrics:
                raise KeyError(
                    f"RLHPOCallback: the evaluation metrics have no {key!r} (got "
                    f"{', '.join(sorted(metrics))}); give the Trainer a compute_metrics that "
                    f"returns {key.removeprefix('eval_')!r}, or pass loss_key=/score_key="
                )
        val_loss, val_score = float(metrics[self.loss_key]), float(metrics[self.score_key])
        if self.samples == 0 and not ctl.history.records:
            d = ctl.start(val_loss=val_loss, val_score=val_score)  # eval_on_start
        else:
            train_loss = sum(self._losses) / len(self._losses) if self._losses else None
            # The logged losses (one per logging_steps) stand in for per-batch ones.
            d = ctl.step(
                train_loss=train_loss,
                val_loss=val_loss,
                val_score=val_score,
                samples=self.samples,
                batch_losses=self._losses,
            )
        self._losses = []
        self._set_steps(args, self._accum.ready())
        self.decisions.append(d)
        if d.done:
            control.should_training_stop = True
        self._log(state, d)

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False

    # -- helpers -------------------------------------------------------------
    @staticmethod
    def _set_steps(args: Any, steps: int | None) -> None:
        if steps is not None:
            args.gradient_accumulation_steps = int(steps)

    def _log(self, state: Any, d: Any) -> None:
        logs = {
            **d.as_log(),
            "hp/accumulation": float(self._accum.batch_size // self._accum.micro_batch),
        }
        log.info(
            "rlhpo: step %d, %d samples: lr %.3g, batch %d, dropout %.2f%s",
            state.global_step,
            self.samples,
            d.lr,
            d.batch_size,
            d.dropout,
            " (rolled back)" if d.rolled_back else "",
        )
        self._trainer.log(dict(logs))


def _constant_factor(step: int) -> float:
    """The LR factor of a schedule the policy has taken over (a module-level function,
    so that LambdaLR's state_dict stays picklable)."""
    return 1.0


def _hold_schedule(scheduler: Any, optimizer: Any, kind: Any) -> None:
    """Make the Trainer's LR scheduler a constant factor 1 from the configured lr, so
    that the lr in the optimizer is the policy's own at every step."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:  # a user's own scheduler: keep it, scale its base values
        log.warning(
            "RLHPOCallback: the LR scheduler %s is not a LambdaLR; the policy's lr moves its "
            "base values, and the schedule still scales the lr between decisions",
            type(scheduler).__name__,
        )
        return
    kind = getattr(kind, "value", kind)
    if kind not in (None, "constant"):
        log.info(
            "RLHPOCallback: the policy sets the lr; the Trainer's %r schedule is replaced by a "
            "constant factor 1",
            kind,
        )
    scheduler.lr_lambdas = [_constant_factor] * len(lambdas)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = float(base)  # a warm-up starts at factor 0: begin at the configured lr
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _wandb_config(values: dict[str, Any]) -> None:
    """Update the config of the live W&B run, if there is one (the Trainer's W&B
    callback starts it before this callback's on_train_begin)."""
    import sys

    wandb = sys.modules.get("wandb")  # only if something already uses it
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is not None:
        run.config.update(values, allow_val_change=True)


def _loss_ignores_num_items(trainer: Any) -> bool | None:
    """Whether the model's loss stays the same when ``num_items_in_batch`` doubles
    (a per-batch mean that ignores it). None when it cannot be checked."""
    import torch

    model = trainer.model
    try:
        ds = trainer.train_dataset
        batch = trainer.data_collator([ds[i] for i in range(min(2, len(ds)))])
        batch = {k: v.to(trainer.args.device) for k, v in batch.items() if torch.is_tensor(v)}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                one = model(**batch, num_items_in_batch=torch.tensor(1)).loss
                two = model(**batch, num_items_in_batch=torch.tensor(2)).loss
        finally:
            model.train(was_training)
        return bool(torch.allclose(one, two))
    except Exception as e:  # any model or data the check does not fit: say so, go on
        log.debug("num_items_in_batch check failed: %r", e)
        return None
