"""Bad input gets a clear error that names the problem."""

import pytest
import torch

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


def test_bad_chunk_size():
    with pytest.raises(RetentionInputError, match="chunk_size"):
        rc.power_retention(*qkv(), chunk_size=-4)
