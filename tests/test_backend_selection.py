"""Backend selection from the weights' device, with the override."""
import pytest
import torch

from mxdit import kernels


def test_cpu_selects_reference(monkeypatch):
    monkeypatch.delenv("MXDIT_KERNEL_BACKEND", raising=False)
    assert kernels.select_backend("cpu").name == "reference"


def test_override_wins(monkeypatch):
    monkeypatch.delenv("MXDIT_KERNEL_BACKEND", raising=False)
    assert kernels.select_backend("cpu", "reference").name == "reference"
    with pytest.raises(ValueError, match="unknown kernel backend 'nope'"):
        kernels.select_backend("cpu", "nope")


@pytest.mark.parametrize("cap,expected", [((9, 0), "triton"), ((8, 9), "triton"), ((10, 0), "triton"), ((8, 0), "reference")])
def test_cuda_capability_decides_triton(monkeypatch, cap, expected):
    pytest.importorskip("triton", reason="selecting the Triton backend needs the triton package")
    monkeypatch.delenv("MXDIT_KERNEL_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    if expected == "reference":
        with pytest.warns(RuntimeWarning, match="no FP8 tensor cores"):
            kernels._WARNED.clear()
            assert kernels.select_backend("cuda").name == "reference"
    else:
        assert kernels.select_backend("cuda:0").name == expected
