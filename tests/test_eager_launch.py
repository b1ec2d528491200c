"""Repeated eager calls of the forward (``codegen.eager_launch``, ``codegen.replays``, ``forward.ForwardReplay``),
on the CPU: what the replay key tells apart, and the arguments a kept launch hands to
the compiled kernel's launcher. The replays themselves run on a GPU (``tests/gpu/test_triton_forward.py``: bitwise
equal to the planned path)."""

from __future__ import annotations

import ctypes

import pytest
import torch
import triton
import triton.language as tl

from retention_compile.codegen import cuda_state, eager_launch, forward
from retention_compile.codegen.eager_launch import CudaLaunch, DirectLaunch
from retention_compile.codegen.nvrtc import KernelParams, arguments_at, packed_arguments
from retention_compile.planning import Plan

PLAN = Plan(chunk_size=1 << 20, block_t=64, block_e=64)
BASE = dict(log_gate=None, valid=None, scale=0.125, deg=2, causal=True, plan=PLAN, segments=None, state_kernel=None,
            y_dtype=torch.bfloat16)  # fmt: skip


def key(q, k, v, **changes) -> tuple:
    options = {**BASE, **changes}
    return forward._replay_key(q, k, v, *(options[name] for name in BASE))


class KeptStateKernel:
    """A state-kernel hook that hands over its launch, as ``cuda_state.CudaStateHook`` does."""

    keeps_launches = True

    def __call__(self, spec, args) -> dict:
        return {}


@pytest.fixture
def inputs(monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, ...]:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(forward.replays, "replayable", lambda q: True)  # CPU tensors stand in for CUDA ones
    return tuple(torch.randn(1, 4, 100, 64, dtype=torch.bfloat16) for _ in range(3))


def test_fresh_tensors_of_the_same_layout_share_a_key(inputs: tuple) -> None:
    again = tuple(torch.randn_like(t) for t in inputs)
    assert key(*inputs) is not None and key(*inputs) == key(*again)


def test_calls_that_are_not_kept_have_no_key(inputs: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state-kernel hook that does not hand over its launch, or a call ``replays.replayable`` refuses."""
    assert key(*inputs, state_kernel=lambda spec, args: {}) is None
    monkeypatch.setattr(forward.replays, "replayable", lambda q: False)
    assert key(*inputs) is None


def test_the_key_tells_apart_what_the_kernels_are_specialized_and_planned_on(
    inputs: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, k, v = inputs
    unaligned = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)
    transposed = q.transpose(1, 2).contiguous().transpose(1, 2)
    variants = {
        "unaligned q": key(unaligned, k, v),
        "strides of q": key(transposed, k, v),
        "dtype of k": key(q, k.float(), v),
        "length of v": key(q, k, torch.randn(1, 4, 101, 64, dtype=v.dtype)),
        "a gate": key(q, k, v, log_gate=-torch.rand(1, 4, 100)),
        "validity": key(q, k, v, valid=torch.ones(1, 100, dtype=torch.bool)),
        "scale": key(q, k, v, scale=0.25),
        "deg": key(q, k, v, deg=4),
        "causal": key(q, k, v, causal=False),
        "plan": key(q, k, v, plan=Plan(chunk_size=1 << 20, block_t=32, block_e=64)),
        "segments": key(q, k, v, segments=3),
        "a CUDA state kernel": key(q, k, v, state_kernel=KeptStateKernel()),
        "y dtype": key(q, k, v, y_dtype=torch.float32),
    }
    tunables = {"QUADRATIC_BLOCK_K": 32, "GATE_SCAN_BLOCK": 1024, "WIDE_STAGES": 1, "MIN_BLOCK_E": 32,
                "STATE_WAVES": 2.0, "STATE_STAGES": 2, "SCAN_WARPS": 8,
                "NARROW_QUERY_LAUNCH": forward.QueryLaunch(64, 4, 3, 2, None)}  # fmt: skip
    for name, value in tunables.items():
        with monkeypatch.context() as patched:
            patched.setattr(forward, name, value)
            variants[name] = key(q, k, v)
    with monkeypatch.context() as patched:
        patched.setattr(cuda_state, "CONFIG", cuda_state.StateKernelConfig())
        variants["the CUDA state kernel's launch shape"] = key(q, k, v)
    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "current_device", lambda: 1)
        variants["current device"] = key(q, k, v)
    base = key(q, k, v)
    for what, other in variants.items():
        assert other != base, f"{what} left the key unchanged"
    assert len(set(variants.values())) == len(variants)


@triton.jit
def sample_kernel(X, Y, n, scale, FLAG: tl.constexpr):
    pass


class Launcher:
    """A launcher called as Triton's are."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata, launch_metadata, launch_enter_hook,
                 launch_exit_hook, *args) -> None:  # fmt: skip
        self.calls.append((gridX, gridY, gridZ, stream, function, kernel_metadata, launch_metadata,
                           launch_enter_hook, launch_exit_hook, *args))  # fmt: skip


class Compiled:
    """What a launch of Triton's JIT hands back, as far as ``DirectLaunch`` reads it."""

    def __init__(self) -> None:
        self.run = Launcher()
        self.function = "function handle"
        self.packed_metadata = "packed metadata"


def test_a_kept_launch_passes_each_calls_tensors_in_parameter_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(eager_launch, "current_stream", lambda device: f"stream of {device}")
    compiled = Compiled()
    first = {"Y": torch.zeros(3), "FLAG": True, "scale": 0.5, "n": 3, "X": torch.ones(3)}
    kept = DirectLaunch.of(sample_kernel, (7, 2), first, compiled)
    x, y = torch.randn(3), torch.randn(3)
    kept({"X": x, "Y": y, "unused": torch.zeros(1)})
    (call,) = compiled.run.calls
    assert call[:7] == (7, 2, 1, "stream of 0", "function handle", "packed metadata", None)
    assert call[7:9] == (None, None)  # no launch hooks
    assert call[9] is x and call[10] is y and call[11:] == (3, 0.5, True)
    with pytest.raises(KeyError):
        kept({"X": x})


def test_a_launch_that_cannot_be_repeated_directly_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    launch = {"X": torch.ones(1), "Y": torch.ones(1), "n": 1, "scale": 1.0, "FLAG": False}
    assert DirectLaunch.of(sample_kernel, (1,), launch, None) is None  # traced through wrap_triton: nothing back
    other_order = Compiled()
    other_order.run = lambda *args: None  # a launcher whose parameters are not Triton's
    assert DirectLaunch.of(sample_kernel, (1,), launch, other_order) is None
    with pytest.raises(ValueError, match="parameters"):
        DirectLaunch.of(sample_kernel, (1,), {**launch, "extra": 1}, Compiled())


def test_the_installed_triton_launcher_takes_the_arguments_in_order() -> None:
    """Triton's CUDA launcher (what ``CompiledKernel.run`` is on a GPU) is called as ``DirectLaunch`` calls it: an
    upgrade that reorders it fails here, on the CPU, instead of replaying wrong arguments (it would not be used)."""
    from triton.backends.nvidia.driver import CudaLauncher

    assert eager_launch.launcher_takes_arguments_in_order(CudaLauncher)
    assert not eager_launch.launcher_takes_arguments_in_order(type(lambda: None))


class LauncherOfTriton36:
    def __call__(self, gridX, gridY, gridZ, stream, function, *args): ...  # noqa: N803 (Triton's names)


class LauncherNamingTooFew:
    def __call__(self, gridX, gridY, *args): ...  # noqa: N803


class LauncherInAnotherOrder:
    def __call__(self, gridX, gridY, gridZ, function, stream, *args): ...  # noqa: N803


class LauncherWithoutTheRest:
    def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata): ...  # noqa: N803


def test_launchers_that_name_the_first_parameters_and_pass_the_rest_on_are_taken() -> None:
    """Triton 3.6's launcher names only the grid, stream and function and passes the metadata, hooks and kernel
    arguments on in ``*args``: the same order, so kept launches work there; other shapes are refused."""
    assert eager_launch.launcher_takes_arguments_in_order(LauncherOfTriton36)
    assert not eager_launch.launcher_takes_arguments_in_order(LauncherNamingTooFew)
    assert not eager_launch.launcher_takes_arguments_in_order(LauncherInAnotherOrder)
    assert not eager_launch.launcher_takes_arguments_in_order(LauncherWithoutTheRest)


def test_direct_launches_only_where_triton_would_launch_directly_and_no_hook_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch._library.triton import set_wrap_triton_enabled
    from triton import knobs

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not eager_launch.direct_launches_allowed()  # wrap_triton enabled: launches go through its tracing
    with set_wrap_triton_enabled(False):
        assert eager_launch.direct_launches_allowed()
        hook = knobs.runtime.launch_enter_hook
        if isinstance(hook, knobs.HookChain):
            monkeypatch.setattr(hook, "calls", [lambda metadata: None])
        else:
            monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda metadata: None)
        assert not eager_launch.direct_launches_allowed()  # a profiler's hook
        monkeypatch.undo()
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not eager_launch.direct_launches_allowed()


def test_a_changed_compile_setting_is_a_new_key(inputs: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    from triton import knobs

    base = key(*inputs)
    monkeypatch.setattr(knobs.runtime, "debug", not knobs.runtime.debug)
    assert key(*inputs) != base


def test_a_kept_call_is_dropped_once_its_kernels_are_loaded_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reloading the rendered kernels (``triton_source._load`` cleared, as the kernel-cache tests do) makes a kept
    call stale: it is not answered from any more, so its possibly unloaded kernels never launch."""
    from retention_compile.codegen import replays, triton_source

    q = torch.randn(1, 2, 50, 32)
    spec = forward.kernel_spec(q, q, 2, False, False, True, 50, PLAN)
    launch = DirectLaunch(Compiled(), (1, 1, 1), 0, (), ())
    modules = ((spec, forward.load_forward(spec)[0]),)
    replay = forward.ForwardReplay.of(modules, False, torch.float32, {}, {}, [launch])
    monkeypatch.setattr(replays, "_KEPT", type(replays._KEPT)())
    replays.keep(("a key",), replay)
    assert replays.kept(("a key",)) is replay
    triton_source._load.cache_clear()
    assert not replay.current() and replays.kept(("a key",)) is None


class CudaKernel:
    """What ``CudaLaunch`` calls of an ``nvrtc.CudaKernel``, for a kernel whose parameters have C ``types``."""

    name = "sample"

    def __init__(self, *types: type) -> None:
        self.types = types
        self.launches: list[tuple] = []

    def launch_params(self, grid, block, params, *, shared_mem=0, stream=None, dependent=False) -> None:
        """Records the arguments as the driver reads them during the launch (``nvrtc.arguments_at``)."""
        self.launches.append((grid, block, arguments_at(params, self.types), shared_mem, stream, dependent))


def test_a_kept_cuda_launch_packs_once_and_passes_each_calls_data_pointers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eager_launch, "current_stream", lambda device: f"stream of {device}")
    kernel = CudaKernel(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_float)
    arguments = (None, None, 5, None, 0.5)
    kept = CudaLaunch.of(kernel, (8, 20, 4), (256, 1, 1), 1024, 0, arguments, ((0, "K"), (1, "V"), (3, "S")))
    k, v, state = torch.randn(2), torch.randn(2), torch.empty(3)
    kept({"K": k, "V": v, "S": state, "unused": torch.zeros(1)})
    ((grid, block, values, shared_mem, stream, dependent),) = kernel.launches
    assert (grid, block, shared_mem, stream, dependent) == ((8, 20, 4), (256, 1, 1), 1024, "stream of 0", False)
    assert values == (k.data_ptr(), v.data_ptr(), 5, state.data_ptr(), 0.5)
    with pytest.raises(KeyError):
        kept({"K": k, "V": v})
    # a programmatic dependent of the kernel before it (the query kernel beside the state kernel) says so each time
    beside = CudaLaunch.of(
        kernel, (8, 20, 4), (256, 1, 1), 1024, 0, arguments, ((0, "K"), (1, "V"), (3, "S")), (), True
    )
    beside({"K": k, "V": v, "S": state})
    beside({"K": k, "V": v, "S": state})
    assert [launch[-1] for launch in kernel.launches] == [False, True, True]


def test_kernel_params_hold_each_argument_as_its_c_type_where_the_address_points() -> None:
    """``KernelParams``' block read through its ``void*`` array: a pointer, an int and a float32 (0.1 rounded as the
    kernel's ``float`` holds it), a rewritten pointer; an integer no 32-bit int holds and a filled argument at a
    tensor position are refused."""
    tensor = torch.randn(3)
    params = KernelParams(*packed_arguments("sample", (tensor, 5, 0.1, None)))
    types = (ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_void_p)
    assert tuple(map(type, params.slots)) == types
    assert arguments_at(params.address, types) == (tensor.data_ptr(), 5, ctypes.c_float(0.1).value, None)
    params.set_pointer(3, tensor.data_ptr() + 4)
    assert params.values() == (tensor.data_ptr(), 5, ctypes.c_float(0.1).value, tensor.data_ptr() + 4)
    with pytest.raises(OverflowError, match="32-bit int"):
        packed_arguments("sample", (2**31,))
    with pytest.raises(ValueError, match="tensor positions"):
        CudaLaunch.of(CudaKernel(ctypes.c_void_p), (1, 1, 1), (32, 1, 1), 0, 0, (tensor,), ((0, "K"),))


def test_threads_launching_one_kept_launch_each_pass_their_own_pointers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pointer slots are rewritten and launched under the block's lock: a thread that yields inside its launch
    (where the driver would be reading) still passes its own tensors."""
    import threading
    import time

    monkeypatch.setattr(eager_launch, "current_stream", lambda device: 0)
    kernel = CudaKernel(ctypes.c_void_p, ctypes.c_int)
    launches = kernel.launches

    def launch_params(grid, block, params, **options) -> None:
        time.sleep(0)  # another thread may run here
        launches.append((threading.get_ident(), arguments_at(params, kernel.types)[0]))

    kernel.launch_params = launch_params
    kept = CudaLaunch.of(kernel, (1, 1, 1), (32, 1, 1), 0, 0, (None, 3), ((0, "K"),))
    tensors = {}

    def run() -> None:
        tensors[threading.get_ident()] = own = torch.empty(4)
        for _ in range(300):
            kept({"K": own})

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(launches) == 1200
    assert all(pointer == tensors[ident].data_ptr() for ident, pointer in launches)


def test_a_kept_cuda_launch_zeroes_its_scratch_per_call_and_leaves_it_to_the_launches_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fold's ``SYNC`` words: a fresh zeroed buffer per call at its position, named in the call's tensors so that
    the query kernel's launch after it reads the same buffer."""
    monkeypatch.setattr(eager_launch, "current_stream", lambda device: "stream")
    kernel = CudaKernel(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
    kept = CudaLaunch.of(kernel, (1, 1, 1), (32, 1, 1), 0, "cpu", (None, None, 7), ((0, "K"),), ((1, 5, "SYNC"),))
    first = {"K": torch.randn(2)}
    kept(first)
    first["SYNC"] += 3  # what the kernel would count
    second = {"K": torch.randn(2)}
    kept(second)
    for tensors, launch in zip((first, second), kernel.launches, strict=True):
        assert launch[2] == (tensors["K"].data_ptr(), tensors["SYNC"].data_ptr(), 7)
    assert second["SYNC"].dtype == torch.int32 and second["SYNC"].tolist() == [0] * 5
    assert first["SYNC"].data_ptr() != second["SYNC"].data_ptr() and first["SYNC"].tolist() == [3] * 5


def test_a_kept_replay_allocates_its_state_buffers_and_names_them_for_the_query_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunked call's replay allocates each state buffer afresh, by the first call's shape and dtype, hands the
    query kernel's names for them (``S_ST``: ``S_LOC``) the same tensors, and runs its steps in order."""
    q = torch.randn(1, 2, 50, 32)
    spec = forward.kernel_spec(q, q, 2, False, False, True, 50, PLAN)
    buffers = {"S_SEG": torch.zeros(2, 3, 8), "S_LOC": torch.zeros(2, 5, 8, dtype=torch.bfloat16)}
    seen: list[tuple[str, dict]] = []
    steps = [lambda t: seen.append(("state", dict(t))), lambda t: seen.append(("query", dict(t)))]
    replay = forward.ForwardReplay.of(((spec, None),), False, torch.float32, buffers, {"S_ST": buffers["S_LOC"]}, steps)
    y, denom = replay(q, q, q, None, None)
    assert [name for name, _ in seen] == ["state", "query"]
    tensors = seen[1][1]
    assert tensors["S_ST"] is tensors["S_LOC"] and tensors["S_LOC"] is not buffers["S_LOC"]
    assert tensors["S_LOC"].shape == (2, 5, 8) and tensors["S_LOC"].dtype == torch.bfloat16
    assert tensors["S_SEG"].shape == (2, 3, 8) and tensors["Y"] is y and tensors["DEN"] is denom


def test_a_replay_of_a_widened_call_hands_its_kernels_float32_copies() -> None:
    """Where the first call's kernels took float32 copies (float16, or bfloat16 with short chunks: its shape class
    is the copies' one), every replay makes them too."""
    q = torch.randn(1, 2, 50, 32, dtype=torch.bfloat16)
    spec = forward.kernel_spec(q, q, 2, False, False, True, 50, PLAN)
    seen: list[torch.dtype] = []
    steps = [lambda t: seen.extend(t[name].dtype for name in ("Q", "K", "V"))]
    replay = forward.ForwardReplay.of(((spec, None),), True, torch.float32, {}, {}, steps)
    replay(q, q, q, None, None)
    assert seen == [torch.float32] * 3
