"""Inputs at the edges of the contract, on the CPU op (the aten path): head dims no kernel is tuned for, empty and
one-token sequences, non-contiguous and expanded (stride 0) inputs, tensors on different devices, NaN and inf.

Argument errors (shapes, dtypes, degree, ...) are in test_checks.py; the GPU side of this matrix is
tests/gpu/test_bad_inputs.py.

NaN and inf follow SDPA: nothing raises or hangs, and a non-finite input never disappears from a row that reads
it (the row is not finite). Other batches and kv heads are untouched. Inside one kv head, as in SDPA's own
kernels, a non-finite key or value may reach rows that do not read it (a masked weight 0 times NaN is NaN in a
matrix product; SDPA on CPU turns every row NaN for one NaN value). A key that ``valid`` masks out is read by no
row: whatever it holds (NaN, inf, 1e20) changes nothing on the CPU forms.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import retention_compile as rc
from retention_compile.checks import RetentionInputError
from retention_compile.reference import power_retention_reference


def make(B=2, Hq=4, Hk=2, Tq=6, Tk=6, d=8, e=8, *, seed=0, dtype=torch.float64, gate=False, padded=False):
    """q, k, v and the optional log-gate (per kv head) and validity mask of one small problem."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, d, generator=gen, dtype=dtype)
    k = torch.randn(B, Hk, Tk, d, generator=gen, dtype=dtype)
    v = torch.randn(B, Hk, Tk, e, generator=gen, dtype=dtype)
    log_gate = -0.3 * torch.rand(B, Hk, Tk, generator=gen, dtype=dtype) if gate else None
    valid = torch.rand(B, Tk, generator=gen) > 0.3 if padded else None
    return q, k, v, log_gate, valid


def gradients(fn, q, k, v, log_gate, **options) -> list[torch.Tensor]:
    """Gradients of ``sum(y * w)`` (w fixed) with respect to q, k, v and the gate, through ``fn``."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v, log_gate) if t is not None]
    y = fn(*leaves[:3], log_gate=leaves[3] if log_gate is not None else None, **options)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    return list(torch.autograd.grad((y * w).sum(), leaves))


@pytest.mark.parametrize("d", [80, 96, 256])
def test_head_dims_without_a_tuned_kernel(monkeypatch: pytest.MonkeyPatch, d: int) -> None:
    """On CPU tensors the aten path serves every head dim, interpreter or not, without a warning."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, gate, valid = make(Tq=5, Tk=7, d=d, e=16, gate=True, padded=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = rc.power_retention(q, k, v, log_gate=gate, valid=valid, chunk_size=3)
    expected = power_retention_reference(q, k, v, log_gate=gate, valid=valid)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(0, 0), (0, 5), (3, 0), (1, 0), (1, 1), (1, 9)])
def test_empty_and_single_token_sequences(causal: bool, Tq: int, Tk: int) -> None:
    """T = 0 gives empty outputs (or zeros for queries without keys) and zero gradients; T = 1 is exact."""
    q, k, v, gate, valid = make(Tq=Tq, Tk=Tk, gate=causal, padded=True)
    options = dict(causal=causal, valid=valid, chunk_size=4)
    y = rc.power_retention(q, k, v, log_gate=gate, **options)
    expected = power_retention_reference(q, k, v, log_gate=gate, causal=causal, valid=valid)
    assert y.shape == (2, 4, Tq, 8) and y.dtype == q.dtype
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-14)
    ours = gradients(rc.power_retention, q, k, v, gate, **options)
    if Tk == 0:  # the oracle's output is a constant then
        theirs = [torch.zeros_like(t) for t in (q, k, v, gate) if t is not None]
    else:
        theirs = gradients(power_retention_reference, q, k, v, gate, causal=causal, valid=valid)
    for mine, ref in zip(ours, theirs):
        assert mine.shape == ref.shape
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)


def strided_inputs() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """q, k, v laid out in ways a model produces: transposed, sliced, and expanded with stride 0."""
    gen = torch.Generator().manual_seed(3)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    B, Hq, Hk, T, d = 2, 4, 2, 9, 8
    return {
        "transposed": (randn(B, T, Hq, d).transpose(1, 2), randn(B, T, Hk, d).transpose(1, 2), randn(B, Hk, d, T).mT),
        "sliced": (randn(B, Hq, 2 * T, d)[:, :, ::2], randn(B, Hk, T, 2 * d)[..., ::2], randn(B, 2 * Hk, T, d)[:, ::2]),
        "expanded": (
            randn(B, 1, T, d).expand(B, Hq, T, d),  # one query shared by every head: stride 0 over heads
            randn(1, Hk, 1, d).expand(B, Hk, T, d),  # one key for every batch and position
            randn(B, Hk, T, 1).expand(B, Hk, T, d),  # a value constant along e
        ),
    }


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_non_contiguous_and_expanded_inputs(layout: str) -> None:
    q, k, v = strided_inputs()[layout]
    assert not all(t.is_contiguous() for t in (q, k, v))
    gate = -0.2 * torch.rand(2, 2, 9, dtype=torch.float64)
    y = rc.power_retention(q, k, v, log_gate=gate, chunk_size=4)
    torch.testing.assert_close(y, power_retention_reference(q, k, v, log_gate=gate), rtol=1e-10, atol=1e-12)
    ours = gradients(rc.power_retention, q, k, v, gate, chunk_size=4)
    for mine, ref in zip(ours, gradients(power_retention_reference, q, k, v, gate)):
        assert mine.shape == ref.shape
        torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("where", ["v", "log_gate", "valid"])
def test_inputs_on_different_devices_are_named_with_the_fix(where: str) -> None:
    q, k, v, gate, valid = make(gate=True, padded=True)
    moved = {"v": v, "log_gate": gate, "valid": valid}
    moved[where] = moved[where].to("meta")
    with pytest.raises(RetentionInputError, match=r"\.to\(") as caught:
        rc.power_retention(q, k, moved["v"], log_gate=moved["log_gate"], valid=moved["valid"])
    assert where.split("_")[0] in str(caught.value) and "meta" in str(caught.value)


def test_every_tensor_on_meta_gives_the_output_shape() -> None:
    q, k, v, gate, valid = (t.to("meta") for t in make(Tq=3, Tk=5, e=6, gate=True, padded=True))
    y = rc.power_retention(q, k, v, log_gate=gate, valid=valid)
    assert y.device.type == "meta" and y.shape == (2, 4, 3, 6)


NAN, INF = float("nan"), float("inf")
NON_FINITE = [(which, value, causal) for which in "qkv" for value in (NAN, INF, -INF) for causal in (True, False)] + [
    ("log_gate", NAN, True)
]  # gates are causal only, and g <= 0


@pytest.mark.parametrize("which,value,causal", NON_FINITE)
def test_nan_and_inf_propagate_like_sdpa(which: str, value: float, causal: bool) -> None:
    """One non-finite element (batch 1, head 1, position 5): the rows that read it are not finite, the other
    batch and the other kv head are bit-identical to the clean run."""
    q, k, v, gate, _ = make(Tq=7, Tk=10, dtype=torch.float32, gate=causal)
    inputs = {"q": q, "k": k, "v": v, "log_gate": gate}
    clean = rc.power_retention(q, k, v, log_gate=gate, causal=causal, chunk_size=4)
    bad = dict(inputs, **{which: inputs[which].clone()})
    bad[which][1, 1, 5] = value
    y = rc.power_retention(bad["q"], bad["k"], bad["v"], log_gate=bad["log_gate"], causal=causal, chunk_size=4)

    heads = [1] if which == "q" else [2, 3]  # the query heads of kv head 1 (group 2)
    reading = torch.zeros(2, 4, 7, dtype=torch.bool)
    if which == "q":
        reading[1, 1, 5] = True
    else:  # query i sits at key position i + Tk - Tq = i + 3
        reading[1, heads] = (torch.arange(7) + 3 >= 5) if causal else True
    assert not torch.isfinite(y).all(-1)[reading].any(), "a row that reads the non-finite input came out finite"
    untouched = torch.ones(2, 4, dtype=torch.bool)
    untouched[1, heads] = False
    assert torch.equal(y[untouched], clean[untouched]), "a non-finite input reached another batch or kv head"


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e20])
@pytest.mark.parametrize("chunk_size", [2, None])  # the chunked form, and the single chunk (quadratic) at T=8
def test_padded_keys_holding_garbage_change_nothing(garbage: float, chunk_size: int | None) -> None:
    """Keys that ``valid`` masks out have weight 0, whatever k and v hold there. NaN, inf or 1e20 (whose phi
    overflows float32) at a padded position turned every row NaN on the chunked form, and dq NaN on the quadratic one
    (0 times NaN in the forms' products); SDPA with the same bool mask is finite for a masked key. Now y and every
    gradient equal the run with zeros there."""
    q, k, v, _, _ = make(B=1, Hq=2, Hk=2, Tq=8, Tk=8, d=4, e=4, dtype=torch.float32)
    valid = torch.ones(1, 8, dtype=torch.bool)
    valid[0, [2, 7]] = False
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[0, :, 7, 0], dirty_v[0, :, 2, 1] = garbage, garbage
    clean_k, clean_v = (t.masked_fill(~valid[:, None, :, None], 0.0) for t in (k, v))
    options = {"valid": valid, "chunk_size": chunk_size}
    y, y_clean = (rc.power_retention(q, a, b, **options) for a, b in ((dirty_k, dirty_v), (clean_k, clean_v)))
    torch.testing.assert_close(y, y_clean)
    grads = gradients(rc.power_retention, q, dirty_k, dirty_v, None, **options)
    clean_grads = gradients(rc.power_retention, q, clean_k, clean_v, None, **options)
    for grad, clean in zip(grads, clean_grads):
        torch.testing.assert_close(grad, clean)


def test_derivatives_other_than_reverse_mode_autograd_raise() -> None:
    """The op has no forward-mode rule: ``torch.func.jvp`` gave a zero tangent (the oracle's had norm 2.3) and a
    ``forward_ad`` dual input a tangent of None, silently; ``torch.func.grad`` raised PyTorch's error about
    ``setup_context``. Each now raises naming what works; vmap and ``backward`` run."""
    q, k, v, _, _ = make(B=1, Hq=1, Hk=1, Tq=5, Tk=5, d=3, e=3)
    tangent = torch.randn_like(q)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return rc.power_retention(x, k, v)

    with pytest.raises(NotImplementedError, match="torch.autograd only"):
        torch.func.jvp(forward, (q,), (tangent,))
    with pytest.raises(NotImplementedError, match="torch.autograd only"):
        torch.func.grad(lambda x: forward(x).sum())(q)
    with torch.autograd.forward_ad.dual_level():
        with pytest.raises(NotImplementedError, match="torch.autograd only"):
            forward(torch.autograd.forward_ad.make_dual(q, tangent))
        torch.testing.assert_close(forward(q), rc.power_retention_reference(q, k, v))  # no dual input: runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's vmap fallback warns that it is slow
        batched = torch.func.vmap(forward)(torch.stack([q, 2 * q]))
    torch.testing.assert_close(batched[1], forward(2 * q))
    leaf = q.clone().requires_grad_()
    forward(leaf).sum().backward()
    assert torch.isfinite(leaf.grad).all()
