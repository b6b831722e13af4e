import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from rlhpo.tasks import load_suite  # noqa: E402


@pytest.fixture(scope="session")
def suite():
    return load_suite("default-v1")


BASE_TASK = """
name = "t"
train = ["a"]
test = []
[tasks.a]
dataset = "digits"
model = "mlp"
metric = "accuracy"
budget_samples = 2000
intervals = 4
default = { lr = 1e-3, batch_size = 64, dropout = 0.1 }
space = { lr = [1e-5, 1e-1], batch_size = [16, 32, 64, 128], dropout = [0.0, 0.5] }
start = { lr = [1e-5, 3e-2], batch_size = [32, 64], dropout = [0.0, 0.3] }
"""


@pytest.fixture
def write_suite(tmp_path):
    """Write a suite TOML (the base one, with text replaced) and return its path."""

    def _write(text: str = BASE_TASK, name: str = "suite.toml"):
        p = tmp_path / name
        p.write_text(text)
        return p

    return _write
