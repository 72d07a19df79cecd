"""Rotations for quantized attention against plain float math (mxdit.formats.rotation)."""
import math

import pytest
import torch

from mxdit.formats.rotation import online_rotation, random_hadamard, rotate_qk


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n", [1, 2, 32, 128])
def test_random_hadamard_is_msmodelslim_construction(n):
    # msmodelslim: seed_all(1234) -> torch.manual_seed; randint(0, 2, (n,)) on the default CPU generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        bits = torch.randint(low=0, high=2, size=(n,))
    signs = bits.to(torch.float64) * 2 - 1
    oracle = (torch.diag(signs) @ _sylvester(n)) / math.sqrt(n)
    got = random_hadamard(n)
    assert got.dtype == torch.bfloat16 and got.shape == (n, n)
    assert torch.equal(got, oracle.to(torch.bfloat16))
    # fp32 variant is orthogonal to fp32 precision and does not touch the global RNG
    state = torch.random.get_rng_state()
    r = random_hadamard(n, dtype=torch.float32)
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.allclose(r.double() @ r.double().T, torch.eye(n, dtype=torch.float64), atol=1e-6)


def test_random_hadamard_seed_and_size_checks():
    assert not torch.equal(random_hadamard(128, seed=1), random_hadamard(128, seed=2))
    with pytest.raises(ValueError, match="power of two"):
        random_hadamard(96)
    with pytest.raises(ValueError, match="positive int"):
        random_hadamard(0)


def test_online_rotation_is_qr_of_seeded_normal():
    r = online_rotation(128)
    assert r.dtype == torch.float32 and r.shape == (128, 128)
    assert torch.allclose(r.double() @ r.double().T, torch.eye(128, dtype=torch.float64), atol=1e-5)
    # R is the Q factor of A = randn(seed 42): R^T A is upper triangular and A = R (R^T A)
    a = torch.randn(128, 128, generator=torch.Generator().manual_seed(42), dtype=torch.float32).double()
    upper = r.double().T @ a
    assert torch.allclose(torch.tril(upper, -1), torch.zeros_like(upper), atol=1e-4)
    assert torch.equal(online_rotation(128, dtype=torch.bfloat16), r.to(torch.bfloat16))


def test_rotate_qk_keeps_scores_and_checks_shapes():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 3, 64, generator=g, dtype=torch.float64)
    k = torch.randn(2, 7, 3, 64, generator=g, dtype=torch.float64)
    r = online_rotation(64, dtype=torch.float64)
    qr, kr = rotate_qk(q, k, r)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k)
    assert torch.allclose(torch.einsum("bqhd,bkhd->bhqk", qr, kr), s, atol=1e-4)
    assert not torch.allclose(qr, q)
    with pytest.raises(ValueError, match="q_rot must be"):
        rotate_qk(q, k, torch.eye(32, dtype=torch.float64))
