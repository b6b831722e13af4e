"""Write the do-nothing residual policy (``policies/v5-prior``): the starting point
of the residual variants, with no training.

Its network ignores the observation (zero weights) and always keeps the level, so
it runs the tuned warm-up + cosine schedule (one lr per interval) with the collapse
guard: the reference a trained residual policy must beat on the validation folds.

    python experiments/transfer/make_prior.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from rlhpo.actions import noop_of, nvec_of
from rlhpo.knobs import KNOBS
from rlhpo.observation import encoder_class
from rlhpo.policy import PolicyNet, save_policy
from rlhpo.residual import BaseSchedule
from rlhpo.safety import COLLAPSE_K

HERE = Path(__file__).resolve().parent


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "policies" / "v5-prior"
    knobs = KNOBS
    torch.manual_seed(0)  # the hidden layers are never used (zero action weights); fixed bytes
    net = PolicyNet(obs_dim=encoder_class(2).size_for(knobs), nvec=nvec_of(knobs))
    with torch.no_grad():
        net.action_net.weight.zero_()
        net.action_net.bias.zero_()
        start = 0
        for n, k in zip(nvec_of(knobs), noop_of(knobs), strict=True):
            net.action_net.bias[start + k] = 1.0
            start += n
    base = BaseSchedule.tuned("default")
    save_policy(
        out,
        net,
        knobs=knobs,
        obs_version=2,
        suite="default",
        agent="none (do-nothing residual prior)",
        timesteps=0,
        episodes=0,
        train_wall_time_s=0.0,
        freeze=["batch_size", "dropout"],
        env={
            "obs_version": 2,
            "collapse_k": COLLAPSE_K,
            "base_schedule": base.to_json(),
            "freeze": ["batch_size", "dropout"],
        },
        guard=True,
        command="python experiments/transfer/make_prior.py",
    )
    print(f"wrote {out}: {base.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
