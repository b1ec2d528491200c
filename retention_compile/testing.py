"""Test helpers: run a model eagerly with every SDPA replaced by the float64 oracle, under the same
decisions the backend takes (DESIGN.md section 2)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F

from .reference import power_retention_reference

_sdpa = F.scaled_dot_product_attention


def oracle_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    deg: int = 2,
) -> torch.Tensor:
    """SDPA's signature with power retention's meaning, computed in float64 by the oracle:
    ``is_causal`` -> causal retention (over the first Tq keys when Tq < Tk; Tq > Tk stays SDPA),
    no mask with Tq == 1 -> the decode step (bottom-right causal), no mask -> non-causal retention.
    Dropout is ignored, as the backend ignores it. Masked calls are not handled here."""
    if attn_mask is not None:
        raise NotImplementedError("oracle_sdpa: masked attention is decided by the mask analysis")
    tq, tk = query.shape[-2], key.shape[-2]
    causal = bool(is_causal) or tq == 1
    if is_causal and tq > tk:
        return _sdpa(query, key, value, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    if is_causal and tq < tk:
        key, value = key[:, :, :tq], value[:, :, :tq]
    y = power_retention_reference(query.double(), key.double(), value.double(), scale=scale, deg=deg, causal=causal)
    return y.to(query.dtype)


@contextlib.contextmanager
def oracle_attention(deg: int = 2) -> Iterator[None]:
    """Within the block, ``F.scaled_dot_product_attention`` is ``oracle_sdpa`` (float64 oracle)."""

    def patched(*args, **kwargs):
        return oracle_sdpa(*args, deg=deg, **kwargs)

    with mock.patch.object(F, "scaled_dot_product_attention", patched):
        yield
