"""The cherry layout of the chunk states (``codegen/cherries.py``) on the CPU: every pair of coordinate groups held
once, the feature map it defines against (q . k)^2, the tables the kernels read, and the query and scan kernels run
by Triton's interpreter on states in that layout (from a float64 torch form of the wgmma state kernel's contract,
``TorchCherryStates``) against the float64 oracle.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the kernel cases run in a subprocess that executes
this file as a script (as in test_triton_forward.py). The CUDA kernel that writes this layout is checked on the GPU
(tests/gpu/test_cuda_state.py).
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from retention_compile.codegen import cherries
from retention_compile.codegen.triton_source import KernelSpec
from retention_compile.testing import interpreted_fixture

pytest.importorskip("triton")


@pytest.mark.parametrize("d", [64, 128, 192])
def test_every_pair_of_groups_is_held_once(d: int) -> None:
    listed = cherries.cherries(d)
    n = d // cherries.GROUP
    pairs = [frozenset((a, b)) for a, b1, b2 in listed for b in (b1, b2)]
    assert len(pairs) == len(set(pairs)) == n * (n + 1) // 2
    assert cherries.cherry_features(d) == d * (d + 8) // 2
    assert all(len(groups) <= 4 for groups in cherries.program_groups(d))  # as many K columns as a pair's program


def test_the_layout_needs_groups_in_sets_of_four_pairs() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        cherries.cherries(32)
    assert cherries.supports_cherries(64) and not cherries.supports_cherries(32)
    assert not cherries.supports_cherries(128)  # the query kernel's 3-bit tables


@pytest.mark.parametrize("d", [64, 128])
def test_features_and_coefficients_give_the_square(d: int) -> None:
    """sum_f coef_f phi_f(q) phi_f(k) = (q . k)^2: the state's rows with the query's weights are the deg-2 kernel."""
    gen = torch.Generator().manual_seed(d)
    q, k = torch.randn(5, d, generator=gen, dtype=torch.float64), torch.randn(7, d, generator=gen, dtype=torch.float64)
    xs, ys = cherries.feature_coordinates(d)
    coef = torch.tensor(cherries.query_coefficients(d), dtype=torch.float64)
    phi_q, phi_k = q[:, xs] * q[:, ys], k[:, xs] * k[:, ys]
    torch.testing.assert_close((phi_q * coef) @ phi_k.T, (q @ k.T) ** 2, rtol=1e-12, atol=1e-12)


def test_query_tables_and_state_programs_name_the_cherries() -> None:
    listed = cherries.cherries(64)
    tables = cherries.query_tables(64)
    for field, name in enumerate(("A", "B1", "B2")):
        assert [(tables[name] >> (3 * s)) & 7 for s in range(len(listed))] == [c[field] for c in listed]
        assert tables[name] < 2**63
    programs = cherries.state_programs(64)
    assert len(programs) == 9
    for p, program in enumerate(programs):
        assert len(program["slots"]) == 2
        for cherry, slots in zip(listed[2 * p : 2 * p + 2], program["slots"], strict=True):
            assert tuple(program["groups"][s] for s in slots) == cherry


def test_the_spec_sizes_the_states_by_layout() -> None:
    fields = dict(
        dtype="bfloat16", head_dim=64, value_dim=64, deg=2, gated=False, has_valid=False, causal=True, chunked=True,
        chunk_size=1024, block_t=128, block_k=64, block_s=64, block_e=64, block_feature=16,
    )  # fmt: skip
    pairs, cherry = KernelSpec(**fields).template_params(), KernelSpec(**fields, cherries=True).template_params()
    assert (pairs["dt"], pairs["state_programs"]) == (2560, 10)
    assert (cherry["dt"], cherry["state_programs"], cherry["n_cherries"]) == (2304, 9, 18)


class TorchCherryStates:
    """A state hook's contract in the cherry layout, in float64 torch (a ``triton_forward`` state hook), but for M,
    which it keeps whole and symmetric (the same quadratic form: the GPU test compares the kernel's M + M^T).

    Unfolded (the wgmma kernel without ``wgmma_fold``; a scan follows): per state head the local state before each
    chunk of its segment (S_LOC, M_LOC: zero at the segment's start) and each segment's total in slot seg + 1 (S_SEG,
    M_SEG); S_c = sum_j exp(G_b - G_j) phi(k_j) v_j^T over the segment's keys before chunk c (b the key before it), M
    likewise with k_j k_j^T (the query reads its quadratic form).

    ``folded`` (the wgmma kernel's default, ``folds_segments``; no scan follows): no segment starts from zero, so LOC
    holds the true state before every chunk and slot seg + 1 the state after segment seg (slot n_seg: after every
    key, what a non-causal query reads). Folded, it also hands over the fold's ``SYNC`` words with every count of
    ``DONE`` complete (``done_counts``), so a causal query kernel takes the launch beside the state kernel
    (``KernelSpec.waits_for_states``: its own program order, a wait that finds its counts complete).
    """

    DONE_TARGET = 3  # programs per head and segment that the counts stand for (any number: the query reads it)

    def __init__(self, folded: bool = False) -> None:
        self.folded = folded
        self.layouts: list[bool] = []

    @staticmethod
    def cherry_rows(spec: KernelSpec, device: torch.device) -> bool:
        return spec.chunked and cherries.supports_cherries(spec.head_dim)

    def folds_segments(self, spec: KernelSpec, device: torch.device) -> bool:
        return self.folded

    def done_counts(self, spec: KernelSpec, device: torch.device, heads: int, n_seg: int) -> tuple[int, int]:
        return 1 + heads * self.DONE_TARGET * n_seg, self.DONE_TARGET

    def __call__(self, spec: KernelSpec, args: dict) -> dict[str, torch.Tensor]:
        self.layouts.append(spec.cherries)
        K, V, G, valid = args["K"].double(), args["V"].double(), args.get("G"), args.get("VALID")
        Hq, group, heads, Tk, shift, n_chunks, per_segment, n_seg = (
            args[n] for n in ("Hq", "group", "state_heads", "Tk", "shift", "n_chunks", "chunks_per_seg", "n_seg")
        )
        B, C, d, e = K.shape[0], spec.chunk_size, K.shape[-1], V.shape[-1]
        xs, ys = cherries.feature_coordinates(d)
        loc = torch.zeros(B * heads, n_chunks, len(xs), e, dtype=torch.float64)
        m_loc = torch.zeros(B * heads, n_chunks, d, d, dtype=torch.float64)
        seg = torch.zeros(B * heads, n_seg + 1, len(xs), e, dtype=torch.float64)
        m_seg = torch.zeros(B * heads, n_seg + 1, d, d, dtype=torch.float64)
        for bs in range(B * heads):
            b, hs = divmod(bs, heads)
            k, v = K[b, hs * (Hq // heads) // group], V[b, hs * (Hq // heads) // group]
            if valid is not None:
                k = k * valid[b, :Tk, None].double()
            g = None if G is None else G[b, hs, :Tk].double()
            for sg in range(n_seg):
                if sg == 0 or not self.folded:
                    s, m = torch.zeros(len(xs), e, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
                for c in range(sg * per_segment, min((sg + 1) * per_segment, n_chunks)):
                    loc[bs, c], m_loc[bs, c] = s, m
                    first = c * C - shift
                    lo, hi = max(first, 0), min(first + C, Tk)
                    w = torch.ones(max(hi - lo, 0), dtype=torch.float64)
                    if g is not None and hi > lo:
                        decay = torch.exp(g[hi - 1] - (g[first - 1] if first >= 1 else 0.0))  # fake tensors too
                        s, m, w = s * decay, m * decay, torch.exp(g[hi - 1] - g[lo:hi])
                    kk = k[lo:hi]
                    s = s + (kk[:, xs] * kk[:, ys]).T @ (w[:, None] * v[lo:hi])
                    m = m + kk.T @ (w[:, None] * kk)
                seg[bs, sg + 1], m_seg[bs, sg + 1] = s, m
        state_dtype = torch.float32 if spec.dtype == "float32" else torch.bfloat16
        out = {"S_SEG": seg.float(), "M_SEG": m_seg.float()}
        if spec.causal:
            out.update(S_LOC=loc.to(state_dtype), M_LOC=m_loc.float())
        if self.folded:
            offset, target = self.done_counts(spec, K.device, B * heads, n_seg)
            out["SYNC"] = torch.zeros(offset + B * heads * n_seg, dtype=torch.int32)
            out["SYNC"][offset:] = target
        return out


CASES = {
    # name: (B, Hq, Hk, Tq, Tk, gate heads (0: none), valid, causal, chunk, segments, states folded by the hook)
    "causal-segments": (1, 2, 1, 150, 150, 0, False, True, 32, 2, False),
    "gated-valid-gqa": (2, 4, 2, 100, 100, 2, True, True, 32, 2, False),
    "prefill-gated": (1, 2, 2, 40, 130, 2, False, True, 32, 3, False),
    "noncausal-valid": (1, 2, 1, 50, 90, 0, True, False, 32, 2, False),
    # folded: the query reads the states as the hook leaves them, no scan between
    "folded-valid-gqa": (2, 4, 2, 100, 100, 0, True, True, 32, 2, True),
    "folded-prefill": (1, 2, 2, 40, 130, 0, False, True, 32, 3, True),
    "folded-gated": (1, 2, 1, 150, 150, 2, False, True, 32, 3, True),
    "folded-noncausal-valid": (1, 2, 1, 50, 90, 0, True, False, 32, 2, True),
}


def _forward_with_cherry_states(case: tuple, traced: bool = False) -> tuple:
    """``triton_forward`` on the case's random inputs with ``TorchCherryStates``: (inputs, options, hook, y, whether
    the last launch waited on the fold's counts). ``traced``: on fake tensors, as Dynamo and Inductor trace a call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from retention_compile.codegen import forward
    from retention_compile.planning import Plan

    B, Hq, Hk, Tq, Tk, gate_heads, has_valid, causal, chunk, segments, folded = case
    gen = torch.Generator().manual_seed(Tq * 7 + Tk)
    q, k, v = (torch.randn(B, h, t, 64, generator=gen) for h, t in ((Hq, Tq), (Hk, Tk), (Hk, Tk)))
    gate = -0.2 * torch.rand(B, gate_heads, Tk, generator=gen) if gate_heads else None
    valid = torch.rand(B, Tk, generator=gen) > 0.25 if has_valid else None
    hook = TorchCherryStates(folded)
    plan = Plan(chunk_size=chunk, block_t=16, block_feature=16, block_e=32)
    waited = []
    launch = forward._launch

    def spy(kernel, grid, kwargs, *rest, **launch_options):
        waited.append("SYNC" in kwargs)
        if not traced:  # fake tensors: what the launch is given is the point (the interpreter runs on data)
            launch(kernel, grid, kwargs, *rest, **launch_options)

    forward._launch = spy
    try:
        with FakeTensorMode(allow_non_fake_inputs=False) if traced else contextlib.nullcontext() as mode:
            tensors = [t if t is None or mode is None else mode.from_tensor(t) for t in (q, k, v, gate, valid)]
            options = {"scale": 0.125, "deg": 2, "log_gate": tensors[3], "causal": causal, "valid": tensors[4]}
            y, _ = forward.triton_forward(*tensors[:3], **options, plan=plan, segments=segments, state_kernel=hook)
    finally:
        forward._launch = launch
    return (q, k, v, gate, valid), hook, y, waited[-1]


def run_case(case: tuple) -> dict[str, float]:
    """y's relative error against the float64 oracle with the states in the cherry layout (float32 kernels), whether
    the call took that layout, whether the query kernel waited on the fold's counts, and whether it did on fake
    tensors (a traced call launches it as an ordinary kernel after the state kernel)."""
    from retention_compile.reference import power_retention_reference

    (q, k, v, gate, valid), hook, y, waited = _forward_with_cherry_states(case)
    causal = case[7]
    ref = power_retention_reference(
        q.double(),
        k.double(),
        v.double(),
        scale=0.125,
        deg=2,
        causal=causal,
        valid=valid,
        log_gate=None if gate is None else gate.double(),
    )
    error = float((y.double() - ref).norm() / ref.norm())
    traced_wait = _forward_with_cherry_states(case, traced=True)[-1]
    return {
        "y": error,
        "cherries": float(hook.layouts == [True]),
        "waited": float(waited),
        "traced_waited": float(traced_wait),
    }


interpreted = interpreted_fixture(__file__, 600)


@pytest.mark.parametrize("name", list(CASES))
def test_query_kernel_reads_cherry_states(interpreted: dict[str, dict[str, float]], name: str) -> None:
    result = interpreted[name]
    assert result["cherries"] == 1.0, "the call did not take the cherry layout"
    folded_causal = CASES[name][-1] and CASES[name][7]
    assert result["waited"] == float(folded_causal), "the query kernel beside the state kernel: folded, causal only"
    assert result["traced_waited"] == 0.0, "a traced call's query kernel is an ordinary launch: no wait"
    assert result["y"] < 1e-5, f"{name}: relative error of y {result['y']:.2e}"


if __name__ == "__main__":
    print(json.dumps({name: run_case(case) for name, case in CASES.items()}))
