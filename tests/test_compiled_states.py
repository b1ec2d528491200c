"""The compiled Triton path's graphs, traced on the CPU: what the forward keeps for the backward under dynamic T.

Nothing runs: AOTAutograd traces the op's body on fake tensors (the Triton path forced, ``ops._triton_unavailable``
patched), Triton lowers each kernel only to TTIR for a stand-in sm_90 target (torch reads which tensors a kernel
writes from it), and the graph compilers record the graphs instead of compiling them. With T dynamic, the forward
returns its chunk states with symbolic shapes, the backward takes them and launches no forward state kernel, and a
second length reuses the graphs (no guard on T). Runs in a subprocess: it replaces Triton's active driver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import retention_compile as rc  # noqa: E402

LENGTHS = (3000, 5000)  # chunk 1024: 3 and 5 chunks
CHUNK = 1024


def trace(max_ratio: float | None) -> list[dict[str, object]]:
    """Compile the op (b=1, h=2, d=e=64, bf16, causal) with dynamic shapes and call it at each of ``LENGTHS``; per
    recorded graph, its tensor inputs' shapes and the Triton kernels it launches, in order. ``max_ratio``: the
    memory rule's bound (None: the default, under which these states, 1.3x y's bytes, are kept)."""
    import triton
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.backends.compiler import GPUTarget

    from retention_compile import ops

    class StandInDriver:
        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(StandInDriver())
    ops._triton_unavailable = lambda *args: None
    if max_ratio is not None:
        ops.KEPT_STATES_MAX_RATIO = max_ratio
    graphs: list[dict[str, object]] = []

    def record(gm: torch.fx.GraphModule, example_inputs) -> object:
        inputs = [str(tuple(n.meta["val"].shape)) for n in gm.graph.find_nodes(op="placeholder")
                  if isinstance(n.meta.get("val"), torch.Tensor)]  # fmt: skip
        kernels = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in gm.graph.nodes
                   if "triton_kernel_wrapper" in str(n.target)]  # fmt: skip
        graphs.append({"inputs": inputs, "kernels": kernels})

        def not_run(*args):
            raise NotImplementedError("traced only")

        return not_run

    backend = aot_autograd(fw_compiler=record, bw_compiler=record, partition_fn=min_cut_rematerialization_partition)
    compiled = torch.compile(
        lambda q, k, v: rc.power_retention(q, k, v, chunk_size=CHUNK, impl="triton"), backend=backend, dynamic=True
    )
    for T in LENGTHS:
        q, k, v = (torch.randn(1, 2, T, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        with pytest.raises(NotImplementedError):
            compiled(q, k, v)
    return graphs


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, object]]]:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kept_states_flow_to_the_backward_under_dynamic_lengths(traced: dict[str, list[dict[str, object]]]) -> None:
    """States kept: the backward graph takes S (heads, ceil(T / 1024), 2560, 64) and M (.., 64, 64) with symbolic
    chunk counts and runs no forward state kernel; both lengths share one forward and one backward graph."""
    forward, backward = traced["kept"]
    assert forward["kernels"] == ["state_kernel", "attention_kernel"]
    assert "state_kernel" not in backward["kernels"] and "reverse_state_kernel" in backward["kernels"]
    states = [shape for shape in backward["inputs"] if "1023)//1024" in shape]
    assert len(states) == 2 and states[0].endswith("2560, 64)") and states[1].endswith("64, 64)"), backward["inputs"]


def test_dropped_states_are_recomputed(traced: dict[str, list[dict[str, object]]]) -> None:
    """States over the memory rule: the backward graph takes no state and recomputes them (its own state kernel)."""
    forward, backward = traced["dropped"]
    assert forward["kernels"] == ["state_kernel", "attention_kernel"]
    assert backward["kernels"].count("state_kernel") == 1
    assert not [shape for shape in backward["inputs"] if "1023)//1024" in shape], backward["inputs"]


if __name__ == "__main__":
    print(json.dumps({"kept": trace(None), "dropped": trace(0.0)}))
