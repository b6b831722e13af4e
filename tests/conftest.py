import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from rlhpo.tasks import load_suite  # noqa: E402

# Property-based tests: a quick default run, a longer one in CI
# (HYPOTHESIS_PROFILE=ci). The deadline is generous because 5 helpers share 2 cores;
# what it catches is a hang or a runaway allocation, not a slow example.
_FUZZ = dict(
    deadline=5000, database=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
settings.register_profile("dev", max_examples=50, **_FUZZ)
settings.register_profile("ci", max_examples=300, **_FUZZ)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


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
