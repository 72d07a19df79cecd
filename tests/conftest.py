"""Fixtures shared by the test files."""
from __future__ import annotations

import sys

import pytest

import fake_torch_npu as fake
import mxdit.kernels as K


@pytest.fixture
def npu(monkeypatch):
    """Install the emulated torch_npu (tests/fake_torch_npu.py) and drop any cached NPUBackend,
    so the test gets a fresh one; yields the emulation module (its CALLS record every op)."""
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.delitem(K._INSTANCES, "npu", raising=False)
    fake.reset_calls()
    yield fake
    K._INSTANCES.pop("npu", None)
