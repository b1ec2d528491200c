"""Bad input gets a clear error that names the problem."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import retention_compile as rc
from retention_compile.checks import RetentionInputError


def qkv(B=1, Hq=4, Hk=2, T=8, d=8, e=8, dtype=torch.float32):
    return (
        torch.randn(B, Hq, T, d, dtype=dtype),
        torch.randn(B, Hk, T, d, dtype=dtype),
        torch.randn(B, Hk, T, e, dtype=dtype),
    )


@pytest.mark.parametrize("fn", [rc.power_retention, rc.power_retention_reference])
@pytest.mark.parametrize(
    "make,kwargs,message",
    [
        (lambda: qkv(Hq=3, Hk=2), {}, "multiple of kv heads"),
        (lambda: qkv(), {"deg": 3}, "even integer"),
        (lambda: qkv(), {"deg": 0}, "even integer"),
        (lambda: qkv(), {"causal": False, "log_gate": -torch.ones(1, 2, 8)}, "gating is defined for causal"),
        (lambda: qkv(), {"log_gate": -torch.ones(1, 3, 8)}, "log_gate must have shape"),
        (lambda: qkv(), {"valid": torch.ones(1, 8)}, "valid must be a bool"),
        (lambda: qkv(), {"valid": torch.ones(2, 8, dtype=torch.bool)}, "valid must have shape"),
        (lambda: (qkv()[0], qkv(d=4)[1], qkv()[2]), {}, "head dims differ"),
        (lambda: tuple(t.to(torch.int32) for t in qkv()), {}, "supported dtypes"),
        (lambda: (qkv()[0].half(), *qkv()[1:]), {}, "share one dtype"),
        (lambda: (qkv()[0][0], *qkv()[1:]), {}, "must have 4 dims"),
        (lambda: (qkv()[0], *qkv(B=2)[1:]), {}, "batch sizes differ"),
        (lambda: qkv(), {"causal": "False"}, "causal must be True or False"),  # a truthy string was causal
        (lambda: qkv(), {"causal": None}, "causal must be True or False"),
        (lambda: qkv(), {"scale": float("inf")}, "scale must be finite"),  # every row NaN
        (lambda: qkv(), {"scale": float("nan")}, "scale must be finite"),
        (lambda: qkv(), {"scale": True}, "scale must be a number"),
        (lambda: qkv(d=0), {}, "no default scale"),  # was ZeroDivisionError
    ],
)
def test_bad_input_raises_clear_error(fn, make, kwargs, message):
    q, k, v = make()
    with pytest.raises(RetentionInputError, match=message):
        fn(q, k, v, **kwargs)


def test_mismatched_devices_named():
    q, k, v = qkv()
    with pytest.raises(RetentionInputError, match="one device"):
        rc.power_retention(q, k.to("meta"), v.to("meta"))


@pytest.mark.parametrize("chunk_size", [-4, 0, True, 2.0])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(RetentionInputError, match="chunk_size"):
        rc.power_retention(*qkv(), chunk_size=chunk_size)


def _gate_overflow_case() -> tuple:
    """A causal call whose positive log-gate (+1 per key over 120 keys) drives G up by 120: past float32's exp
    range (about 88), so the kernels' exp(G_i - G_j) would overflow where the formula is finite."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 120, 16, generator=gen) for _ in range(3))
    return q, k, v, torch.ones(1, 2, 120)


@pytest.mark.parametrize("bad", [1e-3, float("inf")])
def test_positive_log_gate_is_named(bad):
    q, k, v, gate = _gate_overflow_case()
    gate = -gate
    gate[0, 1, 77] = bad
    with pytest.raises(RetentionInputError, match=r"log_gate must be <= 0.*index \(0, 1, 77\), 1 positive"):
        rc.power_retention(q, k, v, log_gate=gate, chunk_size=32)


def test_gate_check_is_what_stops_the_overflow(monkeypatch):
    """Without the check the same call returns non-finite values where the float64 oracle is finite: the error
    replaces a wrong answer, and a gate of zeros (no decay) passes it."""
    q, k, v, gate = _gate_overflow_case()
    ref = rc.power_retention_reference(q.double(), k.double(), v.double(), log_gate=gate.double())
    assert torch.isfinite(ref).all()
    monkeypatch.setattr(rc.checks, "CHECK_GATE_VALUES", "none")
    unchecked = rc.power_retention(q, k, v, log_gate=gate, chunk_size=32)
    assert not torch.isfinite(unchecked).all()
    monkeypatch.setattr(rc.checks, "CHECK_GATE_VALUES", "cpu")
    zero = torch.zeros_like(gate)
    y = rc.power_retention(q, k, v, log_gate=zero, chunk_size=32)
    want = rc.power_retention_reference(q.double(), k.double(), v.double(), log_gate=zero.double())
    assert float((y.double() - want).norm() / want.norm()) < 1e-4


def test_gate_check_stays_out_of_traced_graphs():
    """Under torch.compile and make_fx the op is traced: no value is read (no graph break, no error at trace time,
    for a positive gate too: +0.01 per key stays far from overflow, so the traced call computes the formula)."""
    q, k, v, gate = _gate_overflow_case()

    def f(q, k, v, g):
        return rc.power_retention(q, k, v, log_gate=g, chunk_size=32)

    for g in (-0.01 * gate, 0.01 * gate):
        want = rc.power_retention_reference(q.double(), k.double(), v.double(), log_gate=g.double())
        y = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, g)
        assert float((y.double() - want).norm() / want.norm()) < 1e-4
        traced = make_fx(f)(q, k, v, g)
        assert float((traced(q, k, v, g).double() - want).norm() / want.norm()) < 1e-4


def test_gate_check_reads_parameters_and_gates_that_require_grad():
    q, k, v, gate = _gate_overflow_case()
    with pytest.raises(RetentionInputError, match="log_gate must be <= 0"):
        rc.power_retention(q, k, v, log_gate=torch.nn.Parameter(gate))
    with pytest.raises(RetentionInputError, match="log_gate must be <= 0"):
        rc.power_retention(q, k, v, log_gate=gate.clone().requires_grad_())


def test_gate_check_setting_is_validated_and_device_aware(monkeypatch):
    gate = -torch.ones(1, 2, 4)
    assert rc.checks.gate_check_applies(gate)  # default "cpu"
    assert not rc.checks.gate_check_applies(gate.to("meta"))
    monkeypatch.setattr(rc.checks, "CHECK_GATE_VALUES", "all")
    assert rc.checks.gate_check_applies(gate.to("meta"))
    monkeypatch.setattr(rc.checks, "CHECK_GATE_VALUES", True)
    with pytest.raises(ValueError, match="CHECK_GATE_VALUES must be one of"):
        rc.checks.gate_check_applies(gate)
