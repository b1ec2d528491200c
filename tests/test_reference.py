"""The oracle against the token-by-token recurrence with the symmetric power state (float64), and its weight
condition (what the chunked form's rounding of a row's weights is amplified by)."""

import math

import pytest
import torch

from retention_compile.chunked import power_retention_chunked
from retention_compile.power_features import multiset_index, power_embedding, power_embedding_vjp, state_dim
from retention_compile.reference import (
    power_retention_recurrent,
    power_retention_reference,
    power_retention_weights,
    rounding_spread,
    weight_condition,
)


def random_case(B=2, Hq=4, Hk=2, Tq=7, Tk=11, d=6, e=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, Tk, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, Tk, e, generator=g, dtype=torch.float64)
    return q, k, v, g


@pytest.mark.parametrize("deg", [2, 4])
@pytest.mark.parametrize("gate_heads", [None, "kv", "q"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("lengths", [(11, 11), (7, 11), (1, 9)])
def test_oracle_matches_recurrence(deg, gate_heads, padded, lengths):
    Tq, Tk = lengths
    q, k, v, g = random_case(Tq=Tq, Tk=Tk, seed=deg + Tq)
    log_gate = None
    if gate_heads:
        heads = 2 if gate_heads == "kv" else 4
        log_gate = -0.7 * torch.rand(2, heads, Tk, generator=g, dtype=torch.float64)
    valid = (torch.rand(2, Tk, generator=g) > 0.3) if padded else None
    expected = power_retention_recurrent(q, k, v, deg=deg, log_gate=log_gate, valid=valid, scale=0.4)
    actual = power_retention_reference(q, k, v, deg=deg, log_gate=log_gate, valid=valid, scale=0.4)
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-9)


def test_oracle_rows_without_keys_are_zero():
    q, k, v, _ = random_case(Tq=9, Tk=5)
    y = power_retention_reference(q, k, v)
    assert y[:, :, :4].abs().max() == 0  # Tq > Tk: rows 0..3 see no key (bottom-right alignment)
    assert y[:, :, 4:].abs().max() > 0
    valid = torch.zeros(2, 5, dtype=torch.bool)
    assert power_retention_reference(q, k, v, valid=valid, causal=False).abs().max() == 0


def test_oracle_non_causal_sees_every_key():
    q, k, v, _ = random_case(Hq=2, Hk=2, Tq=3, Tk=6, d=4, e=2)
    w = (q @ k.transpose(-1, -2) / 2.0) ** 2
    expected = (w @ v) / (w.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(power_retention_reference(q, k, v, causal=False), expected)


def test_oracle_output_dtype_follows_q():
    q, k, v, _ = random_case()
    y = power_retention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), power_retention_reference(q, k, v), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("d,deg", [(3, 2), (5, 2), (4, 4), (3, 6)])
def test_power_embedding_is_the_power_kernel(d, deg):
    g = torch.Generator().manual_seed(d * deg)
    x, y = torch.randn(8, d, generator=g, dtype=torch.float64), torch.randn(8, d, generator=g, dtype=torch.float64)
    phi_x, phi_y = power_embedding(x, deg), power_embedding(y, deg)
    assert phi_x.shape == (8, state_dim(d, deg))
    torch.testing.assert_close((phi_x * phi_y).sum(-1), (x * y).sum(-1) ** deg)


@pytest.mark.parametrize("d,deg", [(5, 2), (4, 4), (3, 6)])
def test_power_embedding_follows_the_multiset_table(d, deg):
    """Feature a is c_a x_(i_1) ... x_(i_p) for the a-th multiset of ``multiset_index``: the layout the kernels and the
    decode states share (the embedding builds it from suffixes of the lower degrees, not from the table)."""
    x = torch.randn(7, d, generator=torch.Generator().manual_seed(deg), dtype=torch.float64)
    index, coef = multiset_index(d, deg)
    torch.testing.assert_close(power_embedding(x, deg), x[:, index].prod(-1) * coef)


def test_power_embedding_vjp_matches_autograd():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, state_dim(6, 4), generator=g, dtype=torch.float64)
    (power_embedding(x, 4) * u).sum().backward()
    torch.testing.assert_close(power_embedding_vjp(x.detach(), u, 4), x.grad)


def test_state_dim_values():
    assert state_dim(64, 2) == 2080
    assert state_dim(128, 2) == 8256
    assert all(state_dim(d, p) == math.comb(d + p - 1, p) for d in range(1, 200) for p in (1, 2, 3, 4, 6, 8))


def test_weight_condition_of_nonnegative_inputs_is_at_most_one():
    q, k, _, g = random_case(d=8)
    log_gate = -0.5 * torch.rand(2, 2, 11, generator=g, dtype=torch.float64)
    kappa = weight_condition(q.abs(), k.abs(), log_gate=log_gate)  # |w| = w: kappa = sum w / (sum w + eps)
    assert torch.all(kappa <= 1) and torch.all(kappa > 1 - 1e-3)


def test_weight_condition_of_random_rows_is_near_0_41_d():
    """E (sum_a |q_a k_a|)^2 / E (q.k)^2 = (2/pi)^2 d + 1 - (2/pi)^2 for Gaussian q, k: 26.5 at d = 64."""
    q, k, _, _ = random_case(Tq=64, Tk=256, d=64)
    kappa = weight_condition(q, k, causal=False)
    assert 22 < float(kappa.median()) < 31 and float(kappa.max()) < 1e3


def lone_orthogonal_key_case() -> tuple:
    """float32 q, k, v (magnitude 10, d = 64) and a non-causal validity mask: batch 1 sees one key, nearly
    orthogonal to every query ((s q.k)^2 = 0.01 against (s sum_a |q_a k_a|)^2 near 1e5), batch 0 all 96 keys."""
    g = torch.Generator().manual_seed(3)
    q, k = (10 * torch.randn(2, 2, 96, 64, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 2, 96, 16, generator=g, dtype=torch.float64)
    valid = torch.ones(2, 96, dtype=torch.bool)
    valid[1] = False
    valid[1, 40] = True
    key = k[1, :, 40, None, :]  # (H, 1, d)
    unit = key / key.norm(dim=-1, keepdim=True)
    q[1] = q[1] - (q[1] * unit).sum(-1, keepdim=True) * unit + 0.8 / key.norm(dim=-1, keepdim=True) * unit
    return q.float(), k.float(), v.float(), valid


def test_chunked_float32_resolves_the_rows_within_the_weight_condition():
    """The float32 chunked form (every key through the state here) matches the oracle to 1e-4 on the rows whose
    weight condition is at most 1e5; the lone nearly orthogonal key's rows are past it, and the float32 quadratic
    form still resolves them (each weight from q.k itself)."""
    q, k, v, valid = lone_orthogonal_key_case()
    options = {"deg": 2, "causal": False, "valid": valid}
    expected = power_retention_reference(q.double(), k.double(), v.double(), **options)
    resolvable = weight_condition(q.double(), k.double(), **options) <= 1e5
    assert resolvable[0].all() and not resolvable[1].any()
    chunked = power_retention_chunked(q, k, v, chunk_size=16, **options).double()
    error = (chunked - expected)[resolvable].norm() / expected[resolvable].norm()
    assert error < 1e-4, f"{error:.2e}"
    quadratic = power_retention_reference(q, k, v, **options).double()
    assert (quadratic - expected).norm() / expected.norm() < 1e-4


def test_rounding_spread_from_the_oracles_weights():
    """nu = sqrt(sum_j w_ij^2 v_j^2) / (sum_j w_ij + eps) with the oracle's weights: gated, GQA, validity, causal
    with Tq < Tk; a call without keys gives zeros."""
    q, k, v, g = random_case(Tq=5, Tk=9)
    log_gate = -0.3 * torch.rand(2, 2, 9, generator=g, dtype=torch.float64)
    valid = torch.rand(2, 9, generator=g) > 0.3
    valid[:, -1] = True
    options = {"deg": 2, "log_gate": log_gate, "valid": valid}
    weights = power_retention_weights(q, k, **options)
    values = v.repeat_interleave(2, dim=1)
    want = torch.sqrt((weights**2) @ (values**2)) / (weights.sum(-1, keepdim=True) + 1e-6)
    assert torch.allclose(rounding_spread(q, k, v, **options), want, rtol=1e-12, atol=0)
    empty = rounding_spread(q, k[..., :0, :], v[..., :0, :], causal=False)
    assert empty.shape == (2, 4, 5, 5) and not empty.any()


def test_rounding_spread_of_an_output_that_cancels():
    """One output (Tq = 1, e = 1) whose weighted values cancel exactly: |y_ref| is 0 to rounding, and nu is the
    standard deviation of y under independent relative errors of its weights (r ~ N(0, 1e-6): y's spread over 400
    draws is 1e-3 nu within 15%)."""
    q, k, v, g = random_case(B=1, Hq=1, Hk=1, Tq=1, Tk=40, e=1)
    weights = power_retention_weights(q, k)
    v[0, 0, -1, 0] -= (weights[0, 0, 0] @ v[0, 0, :, 0]) / weights[0, 0, 0, -1]  # now sum_j w_j v_j = 0
    y = power_retention_reference(q, k, v)
    nu = rounding_spread(q, k, v)
    assert float(y.abs().max()) < 1e-12 and float(nu.min()) > 1e-2
    rounded = weights * (1 + 1e-3 * torch.randn((400, *weights.shape), generator=g, dtype=torch.float64))
    moved = rounded @ v / (rounded.sum(-1, keepdim=True) + 1e-6)
    assert abs(float(moved.std(0).squeeze() / (1e-3 * nu.squeeze())) - 1) < 0.15
