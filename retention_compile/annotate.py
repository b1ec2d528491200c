"""Complete a graph's report after the rewrite: each rewritten site's ``Plan`` and the graph's balance.

The plan is the one the op will compute with (``ops.resolve_plan`` asks ``planning.plan`` the same
question): the key length, head dims, dtype, gate and ``B x Hk`` of the op's operands, on the GPU of the
query (``hardware.detect``) or the CPU; symbolic sizes are taken at their hints. A configured
``chunk_size`` overrides the planned chunk, and the plan says so.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any

import torch
from torch import fx

from .balance import graph_balance
from .config import RetentionConfig
from .passes import graph_modules
from .report import Report, SiteRecord
from .sizes import size_hint

log = logging.getLogger(__name__)


def _operand(node: object) -> torch.Tensor:
    """An operand's example value; for the key prefix ``x[:, :, :Tq]`` (which has none), that of ``x``."""
    if isinstance(node, fx.Node) and node.target is operator.getitem and "example_value" not in node.meta:
        node = node.args[0]
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"operand {node} has no example value")
    return value


def _key_length(key: object, q_len: int) -> int:
    """The op's key length: its key's, or ``min(Tq, Tk)`` for the key prefix ``k[:, :, :Tq]``."""
    length = size_hint(_operand(key).shape[2])
    is_prefix = isinstance(key, fx.Node) and key.target is operator.getitem and "example_value" not in key.meta
    return min(q_len, length) if is_prefix else length


def retention_calls(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """The arguments, by name, of every ``retention_compile::power_retention`` call of the graph and of its
    higher-order ops' bodies, in the report's order (``passes.graph_modules``)."""
    op = torch.ops.retention_compile.power_retention.default
    names = [a.name for a in op._schema.arguments]
    return [
        {**dict(zip(names, node.args)), **node.kwargs}
        for module in graph_modules(gm)
        for node in module.graph.nodes
        if node.op == "call_function" and node.target is op
    ]


def plan_call(args: dict[str, Any]) -> dict[str, Any]:
    """The ``Plan`` (as a dict, with the device, T and batch_heads) of one op call from its arguments."""
    from . import hardware, planning
    from .ops import cuda_state_modelled

    q, k, v = _operand(args["q"]), _operand(args["k"]), _operand(args["v"])
    batch, d, kv_heads = size_hint(q.shape[0]), size_hint(q.shape[3]), size_hint(k.shape[1])
    T = _key_length(args["k"], size_hint(q.shape[2]))
    spec = hardware.detect(q.device) if q.device.type == "cuda" else None
    problem = {
        "T": T,
        "d": d,
        "e": size_hint(v.shape[3]),
        "deg": int(args["deg"]),
        "dtype": planning.kernel_dtype(q.dtype, q.device.type == "cuda", int(args["chunk_size"])),
        "gated": args["log_gate"] is not None,
        "batch_heads": batch * kv_heads,
        "cuda_state": cuda_state_modelled(q, args.get("impl", "auto")),
    }
    plan = planning.plan(spec, **problem)
    override = int(args["chunk_size"])
    if override > 0:  # the tiles the op plans for that chunk (ops.resolve_plan)
        tiles = planning.plan(spec, **problem, chunk_size=override)
        plan = dataclasses.replace(
            tiles,
            chunk_size=override,
            reason=f"chunk_size={override} set by RetentionConfig (planned: {plan.chunk_size}); {tiles.reason}",
        )
    device = spec.name if spec is not None else "CPU"
    record = {"device": device, "T": T, "batch_heads": batch * kv_heads, **dataclasses.asdict(plan)}
    if spec is not None:
        record["query_launch"] = query_launch_of_call(args, (q, k, v), T, plan, problem["cuda_state"])
    return record


def query_launch_of_call(
    args: dict[str, Any], operands: tuple[torch.Tensor, ...], kv_len: int, plan, cuda_state: bool
) -> str:
    """How the compiled graph launches the op's query kernel on the GPU (``forward.query_launch`` of the call's
    shape class), which may differ from the plan's tiles.
    ``kv_len`` is the op's key length (for the key prefix ``k[:, :, :Tq]`` shorter than the operand's);
    ``cuda_state``: the plan models the CUDA state kernel (``ops.cuda_state_modelled``, as the plan was made)."""
    from .codegen import forward
    from .codegen.cuda_state import CudaStateHook

    def meta(t: torch.Tensor, length: int) -> torch.Tensor:
        return torch.empty([size_hint(t.shape[0]), size_hint(t.shape[1]), length, size_hint(t.shape[3])],
                           dtype=t.dtype, device="meta")  # fmt: skip

    q, k, v = operands
    metas = [meta(q, size_hint(q.shape[2])), meta(k, kv_len), meta(v, kv_len)]
    gated, has_valid = args["log_gate"] is not None, args["valid"] is not None
    spec, _, _ = forward.call_shape_class(*metas, int(args["deg"]), gated, has_valid, bool(args["causal"]), plan, False)
    # the cherry layout where the wgmma state kernel would write the states (bf16, d = 64, e a multiple of 64, sm_90a):
    # whether it does is the state kernel's choice at the call (``codegen="auto"`` measures)
    cherries = cuda_state and CudaStateHook.cherry_rows(spec, q.device)
    return forward.describe_query_launch(forward.query_launch(spec, plan), cherries)


def attach_plans(gm: fx.GraphModule, records: list[SiteRecord]) -> None:
    """Set ``plan`` on each rewritten record, matched in order with the op calls the rewrite inserted.

    Planning must never stop a compile: a failure is recorded in the plan (``{"error": ...}``).
    """
    rewritten = [r for r in records if r.decision == "rewritten"]
    calls = retention_calls(gm)
    if len(calls) != len(rewritten):
        log.debug("%d rewritten sites but %d retention calls: plans not attached", len(rewritten), len(calls))
        return
    for record, args in zip(rewritten, calls):
        try:
            record.plan = plan_call(args)
        except Exception as error:  # noqa: BLE001  (planning is optional for the rewrite; say why it failed)
            record.plan = {"error": f"no plan: {type(error).__name__}: {error}"}


def annotate(gm: fx.GraphModule, report: Report, config: RetentionConfig, graph_index: int) -> None:
    """Attach plans to the rewritten sites of ``report`` and the graph's weight-state balance."""
    attach_plans(gm, report.sites)
    report.balances.append(graph_balance(gm, report.sites, graph_index, config.deg))
