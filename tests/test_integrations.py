import importlib
import logging
import sys

import numpy as np
import pytest
import torch
from torch import nn

from rlhpo.integrations import GradientAccumulation
from rlhpo.knobs import get_learning_rate
from rlhpo.tasks.datasets import load_data
from tests.test_controller import forced_policy


def _bert(dropout=0.1):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=4,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)


class _TokenSet(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def _accuracy(pred):
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


def _dropouts(model):
    return sorted({m.p for m in model.modules() if isinstance(m, nn.Dropout)})


def test_gradient_accumulation_waits_for_alignment():
    acc = GradientAccumulation(micro_batch=16, steps=2)
    assert acc.request(64) == 64 and acc.ready() == 4  # nothing counted yet: aligned
    for _ in range(5):
        assert acc.micro_batch_done() is None or acc.steps == 4
    assert acc.request(40) == 32  # nearest multiple of the micro-batch
    assert acc.ready() is None  # 5 micro-batches in: not a multiple of 2
    assert acc.micro_batch_done() == 2 and acc.batch_size == 32
    acc.request(128)
    assert acc.epoch_start() == 8
    assert GradientAccumulation(32).request(16) == 32  # cannot go below one micro-batch


def test_hf_callback_changes_lr_batch_and_dropout(tmp_path, monkeypatch):
    import wandb
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from rlhpo.integrations.hf import RLHPOCallback
    from tests.wandb_offline import offline_runs, read_run

    d = load_data("sequences", {"n_samples": 400})
    train, val = _TokenSet(d.x_train, d.y_train), _TokenSet(d.x_val, d.y_val)
    assert len(train) == 240  # 15 micro-batches of 16 per epoch

    class Probe(TrainerCallback):
        def __init__(self):
            self.epochs, self.lrs, self.steps = [], [], 0

        def on_epoch_begin(self, args, state, control, model=None, **kw):
            self.epochs.append([args.gradient_accumulation_steps, _dropouts(model), 0])

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            self.epochs[-1][2] += 1
            self.lrs.append((state.global_step, get_learning_rate(optimizer)))

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_PROJECT", "rlhpo-test")
    (tmp_path / "wb").mkdir()
    wandb.teardown()  # W&B keeps the settings of its first use; make it read this env
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,  # batch 32: the callback moves it into its own knob
        num_train_epochs=3,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=3,  # factor 0 at the start: the callback must not start there
        eval_strategy="epoch",
        eval_on_start=True,  # the untrained model's evaluation: Controller.start()
        logging_strategy="epoch",
        save_strategy="no",
        use_cpu=True,
        report_to="wandb",
        disable_tqdm=True,
        seed=0,
    )
    cb, probe = RLHPOCallback(forced_policy(tmp_path / "pol")), Probe()
    trainer = Trainer(
        model=_bert(),
        args=args,
        train_dataset=train,
        eval_dataset=val,
        compute_metrics=_accuracy,
        callbacks=[cb, probe],
    )
    cb.attach(trainer)
    trainer.train()

    # Batch size: 32 at the start, then 64 -> 128 -> 256 through accumulation 4 -> 8 ->
    # 16; every epoch sees its 15 micro-batches, in ceil(15 / accumulation) steps.
    assert [e[0] for e in probe.epochs] == [4, 8, 16]
    assert [e[2] for e in probe.epochs] == [4, 2, 1]
    assert trainer.state.global_step == 7 and cb.samples == 720
    # Dropout: 0.1 -> 0.2 -> 0.3 -> 0.4 in every dropout module and in the config.
    assert [e[1] for e in probe.epochs] == [[0.2], [pytest.approx(0.3)], [pytest.approx(0.4)]]
    assert trainer.model.config.hidden_dropout_prob == pytest.approx(0.4)  # none at the end
    # LR: doubled at each evaluation, and the optimizer uses exactly the policy's lr at
    # every step: the Trainer's warm-up + linear schedule (sized for 45 steps at
    # accumulation 1) no longer scales it.
    policy_lr = {0: cb.decisions[0].lr, 4: cb.decisions[1].lr, 6: cb.decisions[2].lr}
    assert [dd.lr for dd in cb.decisions[:3]] == pytest.approx([2e-3, 4e-3, 8e-3], rel=1e-12)
    for step, lr in probe.lrs:
        decided_at = max(s for s in policy_lr if s < step)
        assert lr == policy_lr[decided_at], (step, lr, policy_lr[decided_at])
    assert [step for step, _ in probe.lrs] == list(range(1, 8))
    assert [dd.batch_size for dd in cb.decisions] == [64, 128, 256, 256]
    assert cb.decisions[-1].done
    # BERT's head ignores num_items_in_batch: attach() made the Trainer divide by the
    # accumulation, so the training loss does not grow with the batch (ln 4 = 1.39).
    assert trainer.model_accepts_loss_kwargs is False
    losses = [r.train_loss for r in cb.controller.history.records]
    assert losses[0] is None and len(losses) == 4
    assert all(0.5 < x < 2.0 for x in losses[1:]), losses
    # The applied hyperparameters went through trainer.log.
    logged = [h for h in trainer.state.log_history if "hp/batch_size" in h]
    assert [h["hp/batch_size"] for h in logged] == [64.0, 128.0, 256.0, 256.0]
    assert [h["hp/accumulation"] for h in logged] == [4.0, 8.0, 16.0, 16.0]
    # The W&B run (offline) has the real starting batch and accumulation in its config
    # (the Trainer itself runs at accumulation 1) and the hp under train/hp/*.
    wandb.finish()  # the Trainer leaves its run open: flush it
    (run_dir,) = offline_runs(tmp_path / "wb")
    run = read_run(run_dir)
    assert run.config["gradient_accumulation_steps"] == 2
    assert run.config["rlhpo/effective_batch_size"] == 32
    assert run.config["rlhpo/micro_batch"] == 16
    assert run.series("train/hp/batch_size") == [64.0, 128.0, 256.0, 256.0]
    assert run.series("train/hp/accumulation") == [4.0, 8.0, 16.0, 16.0]
    assert run.series("train/hp/lr") == pytest.approx([2e-3, 4e-3, 8e-3, 8e-3], rel=1e-12)


def test_hf_callback_names_missing_metric(tmp_path):
    from transformers import Trainer, TrainingArguments

    from rlhpo.integrations.hf import RLHPOCallback

    d = load_data("sequences", {"n_samples": 200})
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        num_train_epochs=1,
        eval_strategy="epoch",
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=_bert(),
        args=args,
        train_dataset=_TokenSet(d.x_train, d.y_train),
        eval_dataset=_TokenSet(d.x_val, d.y_val),
    )
    RLHPOCallback(forced_policy(tmp_path / "pol")).attach(trainer)
    with pytest.raises(KeyError, match="no 'eval_accuracy' \\(got epoch, eval_loss"):
        trainer.train()


def test_missing_package_gives_install_command(monkeypatch):
    monkeypatch.delitem(sys.modules, "rlhpo.integrations.lightning", raising=False)
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    with pytest.raises(ImportError, match="pip install 'rlhpo\\[lightning\\]'"):
        importlib.import_module("rlhpo.integrations.lightning")
    monkeypatch.delitem(sys.modules, "rlhpo.integrations.lightning", raising=False)
    monkeypatch.delitem(sys.modules, "rlhpo.integrations.hf", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install 'transformers"):
        importlib.import_module("rlhpo.integrations.hf")


def test_lightning_callback_changes_lr_batch_and_dropout(tmp_path, caplog):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from rlhpo.integrations.lightning import RLHPOCallback

    d = load_data("digits")
    n_train = len(d.x_train)
    train = torch.utils.data.TensorDataset(d.x_train[:320], d.y_train[:320])
    val = torch.utils.data.TensorDataset(d.x_val, d.y_val)
    assert n_train >= 320

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10)
            )
            self.raw_losses = {0: [], 1: [], 2: []}

        def training_step(self, batch, i):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.raw_losses[self.current_epoch].append(loss.item())
            return loss

        def validation_step(self, batch, i):
            x, y = batch
            out = self.net(x)
            self.log("val_loss", nn.functional.cross_entropy(out, y))
            self.log("val_accuracy", (out.argmax(-1) == y).float().mean())

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.01)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Probe(pl.Callback):
        def __init__(self):
            self.epochs, self.lrs = [], []

        def on_train_epoch_start(self, trainer, module):
            self.epochs.append([trainer.accumulate_grad_batches, _dropouts(module), 0])

        def on_before_optimizer_step(self, trainer, module, optimizer):
            self.epochs[-1][2] += 1

        def on_train_batch_end(self, trainer, module, outputs, batch, i):
            if not self.lrs or self.lrs[-1][0] != trainer.global_step:  # after a step
                self.lrs.append((trainer.global_step, get_learning_rate(trainer.optimizers[0])))

    cb, probe = RLHPOCallback(forced_policy(tmp_path / "pol"), n_classes=10), Probe()
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path / "logs", name="t"),
        callbacks=[cb, probe],
    )
    model = Net()
    with caplog.at_level(logging.INFO, logger="rlhpo.integrations.lightning"):
        trainer.fit(
            model,
            torch.utils.data.DataLoader(train, batch_size=16, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=64),
        )
    # Starts at batch 16 (the loader's); the forced policy moves it up one step per
    # evaluation: accumulation 1 -> 2 -> 4 over 20 micro-batches per epoch.
    assert [e[0] for e in probe.epochs] == [1, 2, 4]
    assert [e[2] for e in probe.epochs] == [20, 10, 5]
    assert cb.samples == 960 and trainer.global_step == 35
    assert [e[1] for e in probe.epochs] == [[0.1], [pytest.approx(0.2)], [pytest.approx(0.3)]]
    # LR doubled at each evaluation and the step scheduler keeps applying to the new level.
    for gs, lr in probe.lrs:
        base = 0.01 * (1 if gs <= 20 else 2 if gs <= 30 else 4)
        assert lr == pytest.approx(base / (1 + 0.01 * gs), rel=1e-6), gs
    assert [gs for gs, _ in probe.lrs] == list(range(1, 36))
    # The training loss the policy saw is the mean of training_step's losses (all
    # batches hold 16 samples), not Lightning's loss divided by the accumulation.
    seen = [r.train_loss for r in cb.controller.history.records]
    want = [np.mean(model.raw_losses[e]) for e in range(3)]
    np.testing.assert_allclose(seen, want, rtol=1e-5)
    # Logged to the trainer's logger.
    import csv

    rows = list(csv.DictReader(open(trainer.logger.log_dir + "/metrics.csv")))
    logged = [float(r["hp/batch_size"]) for r in rows if r.get("hp/batch_size")]
    assert logged == [32.0, 64.0, 64.0]
    # ... on the steps of the validation metrics the decisions answered.
    hp_steps = [int(r["step"]) for r in rows if r.get("hp/batch_size")]
    val_steps = [int(r["step"]) for r in rows if r.get("val_loss")]
    assert hp_steps == val_steps == [19, 29, 34]
    assert "rlhpo: epoch" in caplog.text
