"""Fine-tune a small pretrained model in a plain torch loop with the shipped policy.

Everything runs offline on a CPU in about ten seconds: a 2-layer MLP body is
pretrained here on a generated source task (10,000 examples, 8 classes), then
fine-tuned with a new head on 140 examples of a related 4-class target from the
user's lr of 3e-5. Three runs per seed from the same weights and data order:

- ``static``: the user's lr, unchanged;
- ``policy (tuned peak)``: ``Controller.load("default")`` as it ships: its level
  starts at the peak tuned for training from scratch (Adam 0.02), ignoring the lr;
- ``policy (user peak x30)``: ``base_peak="user", peak_factor=30``: the level starts
  at the user's lr x 30 (30 was chosen on the train split of suite ``finetune``).

    OMP_NUM_THREADS=1 python examples/finetune_controller.py
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rlhpo import Controller
from rlhpo.tasks.datasets import load_data

USER_LR = 3e-5
EPOCHS = 20  # one decision per epoch
SEEDS = (0, 1, 2)


def mlp_body() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(32, 128),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Dropout(0.1),
    )


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = model(x)
        loss = nn.functional.cross_entropy(out, y).item()
        acc = (out.argmax(1) == y).float().mean().item()
    model.train()
    return {"val_loss": loss, "val_score": acc}


def pretrain() -> nn.Sequential:
    """The body, trained with its own head on the source task (then the head is dropped)."""
    src = load_data("latent", {"n_samples": 10000, "n_classes": 8, "relatedness": 1.0})
    body = mlp_body()
    model = nn.Sequential(body, nn.Linear(128, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(src.x_train, src.y_train), batch_size=64, shuffle=True)
    for _ in range(20):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    print(
        f"pretrained body: source val accuracy {evaluate(model, src.x_val, src.y_val)['val_score']:.3f}"
    )
    return body


def finetune(body: nn.Sequential, data, mode: str, seed: int) -> tuple[float, list[float], int]:
    """One fine-tuning run; ``mode``: static, tuned or user."""
    torch.manual_seed(seed)
    model = nn.Sequential(copy.deepcopy(body), nn.Linear(128, 4))  # a new head
    opt = torch.optim.AdamW(model.parameters(), lr=USER_LR)
    train_set = TensorDataset(data.x_train, data.y_train)
    budget = EPOCHS * len(train_set)
    ctl = None
    if mode != "static":
        peak = {"base_peak": "user", "peak_factor": 30.0} if mode == "user" else {}
        ctl = Controller.load(
            "default", optimizer=opt, model=model, budget_samples=budget, n_classes=4,
            batch_size=32, n_val=len(data.y_val), **peak,
        )  # fmt: skip
        loader = ctl.loader(train_set, seed=seed)
        ctl.start(**evaluate(model, data.x_val, data.y_val))
    else:
        loader = DataLoader(
            train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
    lrs, seen = [], 0
    for _ in range(EPOCHS):
        lrs.append(opt.param_groups[0]["lr"])
        losses = []
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        seen += len(train_set)
        if ctl is not None:
            ev = evaluate(model, data.x_val, data.y_val)
            ctl.step(train_loss=sum(losses) / len(losses), samples=seen, **ev)
    restores = sum("collapse" in e or "diverge" in e for e in ctl.events) if ctl else 0
    return evaluate(model, data.x_test, data.y_test)["val_score"], lrs, restores


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    body = pretrain()
    # Few examples to learn from, more to score on: 140 train, 80 val, 180 test.
    target = load_data(
        "latent", {"n_samples": 400, "n_classes": 4, "relatedness": 0.8}, test_fraction=0.45
    )
    print(f"target: {len(target.y_train)} training examples, user lr {USER_LR:g}")
    runs = {
        "static": "static",
        "policy (tuned peak)": "tuned",
        "policy (user peak x30)": "user",
    }
    rows = []
    for name, mode in runs.items():
        accs, restores = [], 0
        for seed in SEEDS:
            acc, lrs, n = finetune(body, target, mode, seed)
            accs.append(acc)
            restores += n
            if seed == SEEDS[0]:
                trace = " ".join(f"{lr:.1e}" for lr in lrs[::2])
                print(f"{name:24s} lr every 2nd epoch: {trace}")
        rows.append((name, accs, max(lrs), restores))
    print()
    seeds = ", ".join(map(str, SEEDS))
    print(f"| run | test accuracy, seeds {seeds} | mean | highest lr | guard restores |")
    print("|---|---|---:|---:|---:|")
    for name, accs, top, n in rows:
        each = ", ".join(f"{a:.3f}" for a in accs)
        print(f"| {name} | {each} | {sum(accs) / len(accs):.3f} | {top:.1e} | {n} |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
