"""Process-level settings for running training work on small CPU machines."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for benchmark tables: floating point,
    and so a chaotic training run, differs between CPUs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def limit_threads(n: int | None = None) -> int:
    """Give torch one intra-op thread (or ``RLHPO_THREADS``) in this process.

    On 2-core machines, torch with 2 threads while anything else runs was measured
    40-180x slower than with 1: rlhpo runs one thread per worker process.
    Returns the thread count now in force.
    """
    if n is None:
        n = int(os.environ.get("RLHPO_THREADS", "1"))
    if n < 1:
        raise ValueError(f"RLHPO_THREADS must be >= 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# Ray must not phone home (no network here) nor write loggers we do not read; its
# workers run torch with one thread, as every rlhpo worker process does.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_MAX_PENDING_TRIALS_PG": "1",
    "RAY_DEDUP_LOGS": "0",
    "OMP_NUM_THREADS": "1",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
# What a Ray worker process is given (runtime_env): one BLAS/OpenMP thread.
RAY_WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Seconds to reach a cluster's address before calling it unreachable. ray.init itself
# retries an address nobody answers for minutes (measured: over 120 s with Ray 2.60).
RAY_PROBE_TIMEOUT_S = 10.0


def probe_ray_address(address: str, timeout_s: float = RAY_PROBE_TIMEOUT_S) -> None:
    """Raise ``ConnectionError`` within about ``timeout_s`` unless a Ray cluster that
    lets this process in answers at ``address`` (``HOST:PORT``; ``ray://HOST:PORT``
    is only checked to listen; ``auto`` is left to Ray, which fails fast).

    A TCP connect first (an address that drops packets), then one request to the
    cluster's GCS with this process's auth settings: a port that is not Ray, or a
    token cluster joined without ``RAY_AUTH_MODE=token``, fails here in a second,
    where ``ray.init`` would retry for minutes.
    """
    import socket
    import threading

    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConnectionError(f"not HOST:PORT, ray://HOST:PORT or auto: {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {hostport} ({e.strerror or e})") from None
    if address.startswith("ray://"):
        return
    set_ray_environment()
    import ray

    answer: list[BaseException | None] = []

    def ask() -> None:
        try:
            gcs = ray._raylet.GcsClient(address=hostport)
            gcs.internal_kv_get(b"rlhpo-probe", None, timeout=timeout_s)
            answer.append(None)
        except Exception as e:  # noqa: BLE001 - any failure means: not usable
            answer.append(e)

    # A daemon thread: a GCS client stuck in Ray's own retries must not keep us waiting.
    asker = threading.Thread(target=ask, name="rlhpo-ray-probe", daemon=True)
    asker.start()
    asker.join(timeout_s)
    if not answer:
        raise ConnectionError(f"no Ray cluster answers at {hostport} within {timeout_s:g} s")
    if answer[0] is not None:
        # Ray's first sentence says what is wrong (its auth errors go on for lines).
        msg = " ".join(str(answer[0]).split()).split(". ")[0][:240]
        raise ConnectionError(f"{hostport}: {type(answer[0]).__name__}: {msg}")


def ray_unreachable_message(address: str | None, err: BaseException) -> str:
    """The one line rlhpo prints when it cannot join the Ray cluster at ``address``."""
    return (
        f"--address {address}: cannot connect to the Ray cluster ({err}); a cluster "
        "started with `ray start --head` uses token auth (Ray 2.60): set "
        "RAY_AUTH_MODE=token in this shell (the token is read from ~/.ray/auth_token "
        "or RAY_AUTH_TOKEN)"
    )


def set_ray_environment() -> None:
    """Ray's settings from :data:`RAY_ENV`, unless the user set them; before Ray is
    imported, which reads some of them then."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)


def ensure_ray(num_cpus: int = 2, address: str | None = None) -> bool:
    """Start a local Ray instance (no dashboard, no network) unless one is running, or
    join the cluster at ``address`` (``ConnectionError`` within seconds if nobody
    answers there, instead of Ray's minutes of retries).

    Returns True if this call started or joined it (the caller should shut it down).
    """
    set_ray_environment()
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("Ray is not installed: pip install 'rlhpo[ray]'") from e
    if ray.is_initialized():
        return False
    if address:
        probe_ray_address(address)
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    return True
