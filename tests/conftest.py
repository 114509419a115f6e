"""Shared test setup: offline guard, seed hygiene, tiny pipelines.

- The Hugging Face libraries are put in offline mode before anything imports them, and any
  socket connection to a non-loopback address raises :class:`NetworkAccessError`: tests never
  touch the network.
- Every test starts from ``torch.manual_seed(0)`` (and ``random``/``numpy`` seeded) and the
  global RNG state is restored afterwards, so tests do not depend on their order.
- torch runs single-threaded by default (``DQ_TEST_THREADS`` overrides): on this shared 2-core
  machine two threads under load made the tiny pipeline ~20x slower.

Fixtures:
    tiny_sd / tiny_sdxl: session-scoped tiny pipelines (seed 0). Treat them as read-only:
        a test that changes weights, modules, scheduler or config uses a ``fresh_*`` fixture.
    fresh_tiny_sd / fresh_tiny_sdxl: a new pipeline per test (seed 0), free to mutate.
"""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import ipaddress  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


class NetworkAccessError(RuntimeError):
    """Raised when a test tries to open a non-loopback network connection."""


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_local(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths and the like
        return True
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode()
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def _guarded(real):
    def connect(self, address, *args, **kwargs):
        if not _is_local(address):
            raise NetworkAccessError(
                f"test tried to connect to {address!r}: tests must run offline; build models "
                "with dq.testing (tiny_sd_pipeline, ...) or load from a local directory"
            )
        return real(self, address, *args, **kwargs)

    return connect


socket.socket.connect = _guarded(_real_connect)
socket.socket.connect_ex = _guarded(_real_connect_ex)

torch.set_num_threads(int(os.environ.get("DQ_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed_hygiene():
    """Seed torch/random/numpy to 0 for each test; restore the global RNG states after."""
    py_state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
        np.random.seed(0)
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        np, np_state = None, None
    random.seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield
    random.setstate(py_state)
    if np is not None:
        np.random.set_state(np_state)


@pytest.fixture(scope="session")
def tiny_sd():
    """Session-wide tiny StableDiffusionPipeline (seed 0). Read-only: mutate fresh_tiny_sd."""
    from dq.testing import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl():
    """Session-wide tiny StableDiffusionXLPipeline (seed 0). Read-only: mutate fresh_tiny_sdxl."""
    from dq.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture
def fresh_tiny_sd():
    """A new tiny StableDiffusionPipeline (seed 0) for a test that mutates it."""
    from dq.testing import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)


@pytest.fixture
def fresh_tiny_sdxl():
    """A new tiny StableDiffusionXLPipeline (seed 0) for a test that mutates it."""
    from dq.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)
