"""Shared fixtures. `hub_server`: a loopback Hugging Face Hub (tests/hub_server.py) for upload/download tests;
`accelerator`: a CPU `Accelerator`, its global state reset afterwards; `stalled_hub_endpoint`: the URL of a Hub that
accepts connections and never answers."""

from __future__ import annotations

import pytest
from hub_server import LoopbackHub, stalled_endpoint


@pytest.fixture
def hub_server(tmp_path_factory: pytest.TempPathFactory):
    """A running `LoopbackHub` on 127.0.0.1 (free port), storing repos in a fresh temporary directory.

    In-process code must pass `endpoint=hub_server.endpoint` (and `token=hub_server.token`) explicitly:
    huggingface_hub reads HF_ENDPOINT once at import. Subprocesses get `hub_server.client_env(hf_home)`.
    """
    with LoopbackHub(tmp_path_factory.mktemp("loopback_hub")) as hub:
        yield hub
    assert not hub.server_errors, f"the loopback hub failed internally: {hub.server_errors}"


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def stalled_hub_endpoint():
    with stalled_endpoint() as endpoint:
        yield endpoint
