"""Power retention as a transformers attention implementation, for eager HF users.

    import retention_compile.hf  # registers "power_retention"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="power_retention")

Importing this module registers ``power_retention_attention`` in transformers' ``AttentionInterface`` (and
SDPA's boolean mask builder in ``AttentionMaskInterface``, so the function receives the same masks as
``sdpa``). Each call runs the ``retention_compile::power_retention`` op, as the compiled rewrite does:

    no mask          causal (``module.is_causal``, the model's flag) or non-causal; the decode step (Tq == 1)
                     sees every key; with Tq > 1 and more keys than queries, the first Tq keys (SDPA's
                     top-left ``is_causal``, as ``sdpa`` itself crops them)
    a mask           read entry by entry: ``valid[b, j]`` = some query may see key j, and the mask must
                     equal the causal, sliding-window (its window dropped, as ``sliding_window='full'``)
                     or full grid restricted to the valid keys; eagerly, else that grid over the first
                     key slots it uses (a ``StaticCache`` longer than the sequence so far, its unused slots
                     cropped); anything else raises ``ValueError``

Under ``torch.compile`` the mask check is an ``_assert_async`` against the grid the model's flags give
(``is_causal``, ``sliding_window``), so the function adds no graph break; with more key slots than queries
(Tq > 1) the grid's alignment is read from the mask and the slots rotated to it (``_read_aligned_mask``), so a
``StaticCache`` prefill, left padding included, runs compiled too. For the proven rewrite of
``sdpa`` models, use ``attn_implementation="sdpa"`` with ``backend="retention"`` instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .ops import power_retention
from .passes.grids import MASKED_BELOW, causal_grid, classify_grid, window_grid

NAME = "power_retention"
UNSUPPORTED = ("softcap", "position_bias", "s_aux", "sinks")


def _admitted(mask: Tensor) -> Tensor:
    """The bool "may attend" grid of a bool mask, or of a float mask with no bias other than masking."""
    if mask.dtype == torch.bool:
        return mask
    admitted = mask > MASKED_BELOW
    if not torch.compiler.is_compiling() and bool((mask.masked_fill(~admitted, 0) != 0).any()):
        raise ValueError("power_retention attention: the float attention mask carries a bias, not only masking")
    return admitted


def _valid_keys(admitted: Tensor) -> Tensor:
    """(B, Tk): the keys some query of some head may see in a mask (B, 1|H, Tq, Tk)."""
    return admitted.expand(admitted.shape[0], -1, -1, -1).any(1).any(1)


def _assert_grid(admitted: Tensor, grid: Tensor, valid: Tensor) -> None:
    """``_assert_async`` (no graph break) that the mask is ``grid`` (Tq, Tk) on the ``valid`` keys."""
    same = (admitted == (grid & valid[:, None, None, :])).all()
    torch._assert_async(same, "power_retention attention: the mask is not the model's causal/window grid")


def _read_mask(admitted: Tensor, q_len: int, kv_len: int, is_causal: bool, window: int | None) -> tuple[bool, Tensor]:
    """(causal, valid (B, Tk)) of a mask (B, 1|H, Tq, Tk), checked to be exactly that grid on valid keys."""
    valid = _valid_keys(admitted)
    if torch.compiler.is_compiling():
        window = window if is_causal else None
        grid = causal_grid(q_len, kv_len, admitted.device) if is_causal else torch.ones_like(admitted[0, 0])
        if window:
            grid = window_grid(q_len, kv_len, int(window), admitted.device)
        _assert_grid(admitted, grid, valid)
        return is_causal, valid
    shape = classify_grid(admitted, q_len, kv_len, valid)
    if not shape.known:
        raise ValueError(f"power_retention attention: the attention mask is {shape.describe()}")
    return shape.causal or shape.window is not None, valid


def _read_aligned_mask(
    admitted: Tensor, key: Tensor, value: Tensor, window: int | None
) -> tuple[bool, Tensor, Tensor, Tensor]:
    """Under ``torch.compile``, Tq > 1 causal queries over Tk > Tq key slots, whose alignment the shapes do not
    tell: query i sees keys ``j <= i + a`` with ``a = Tk - Tq`` after a cache's earlier tokens, and ``a < Tk - Tq``
    in a ``StaticCache`` whose last slots are still unused (``a = 0`` at its prefill). ``a`` is read from the mask,
    as the largest ``(last key row i sees) - i``, and the mask checked (``_assert_async``) to be that grid (or its
    window) on the valid keys. The op's causal grid is bottom-right (``a = Tk - Tq``), so the key slots are rotated
    to end at the last one in use, ``slot (j + Tq + a) mod Tk`` at position j: the ``Tk - Tq - a`` unused slots come
    first, seen by no query, so invalid. Returns (causal, valid, key, value), the last three rotated."""
    q_len, kv_len = admitted.shape[-2], admitted.shape[-1]
    keys = torch.arange(kv_len, device=admitted.device)
    rows = torch.arange(q_len, device=admitted.device)
    last_seen = torch.where(admitted, keys, -1).amax(-1)
    align = (last_seen - rows).amax().clamp(0, kv_len - q_len)
    reach = rows[:, None] + align
    grid = keys[None, :] <= reach
    if window:
        grid = grid & (keys[None, :] > reach - int(window))
    valid = _valid_keys(admitted)
    _assert_grid(admitted, grid, valid)
    order = (keys + q_len + align) % kv_len
    return True, valid.index_select(1, order), key.index_select(2, order), value.index_select(2, order)


def _used_keys(admitted: Tensor, q_len: int) -> int | None:
    """The key slots a mask reads, where fewer than all and at least ``q_len``: the first slots of a cache longer
    than the sequence so far (transformers' ``StaticCache``), which no query may see past. Its prefill mask is causal
    from the first slot (top-left), and it is bottom-right causal over the slots in use. None otherwise."""
    seen = admitted.flatten(0, -2).any(0).nonzero()
    used = int(seen.max()) + 1 if seen.numel() else 0
    return used if q_len <= used < admitted.shape[-1] else None


def _read_cache_mask(
    admitted: Tensor, key: Tensor, value: Tensor, is_causal: bool, window: int | None
) -> tuple[bool, Tensor, Tensor, Tensor]:
    """``_read_mask`` eagerly, and where the mask is not read so, again over the cache slots it uses
    (``_used_keys``): (causal, valid, key, value), the two cropped to those slots."""
    q_len, kv_len = admitted.shape[-2], admitted.shape[-1]
    try:
        return (*_read_mask(admitted, q_len, kv_len, is_causal, window), key, value)
    except ValueError:
        used = _used_keys(admitted, q_len)
        if used is None:
            raise
    causal, valid = _read_mask(admitted[..., :used], q_len, used, is_causal, window)
    return causal, valid, key[:, :, :used], value[:, :, :used]


def power_retention_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    deg: int = 2,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: q (B, Hq, Tq, d), k/v (B, Hk, Tk, d) -> (B, Tq, Hq, e).
    Dropout is ignored (retention has no attention matrix to drop)."""
    given = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if given:
        raise ValueError(f"power_retention attention does not support {given}")
    is_causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    q_len, kv_len = query.shape[2], key.shape[2]
    valid = None
    if attention_mask is None:
        causal = is_causal and q_len > 1
        if causal and kv_len > q_len:
            key, value = key[:, :, :q_len], value[:, :, :q_len]
    else:
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        admitted = _admitted(attention_mask)
        if torch.compiler.is_compiling() and is_causal and kv_len > q_len > 1:
            causal, valid, key, value = _read_aligned_mask(admitted, key, value, window)
        elif torch.compiler.is_compiling():
            causal, valid = _read_mask(admitted, q_len, kv_len, is_causal, window)
        else:
            causal, valid, key, value = _read_cache_mask(admitted, key, value, is_causal, window)
            if bool(valid.all()):
                valid = None
    out = power_retention(query, key, value, scale=scaling, deg=deg, causal=causal, valid=valid)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> None:
    """Register ``power_retention_attention`` (and SDPA's mask builder) under ``attn_implementation=name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, power_retention_attention)
    AttentionMaskInterface.register(name, sdpa_mask)


register()
