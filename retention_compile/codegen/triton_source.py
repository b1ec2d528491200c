"""Shape-specialised Triton sources for power retention: render, cache on disk, import.

    KernelSpec                 everything a rendered forward source depends on (shape class, flags, tiles)
    render_forward(spec)       the jinja2 template ``templates/forward.py.j2`` -> Python/Triton module source
    load_forward(spec)         -> (module, path): the source cached by content hash (and versions) in
                               ``cache.cache_dir("triton")`` (never the package), written atomically, rewritten
                               when the entry's bytes differ from the render (truncated), imported once per process
    render(template, spec[, interpret]) / load(template, spec)
                               the same for any template of ``templates/`` and any hashable spec with
                               ``template_params()`` (the backward: ``backward.BackwardSpec``)

A rendered module defines ``attention_kernel`` and, on the chunked path, ``state_kernel`` and ``scan_kernel``
(see the template and ``triton_forward``). Sizes that vary from call to call (batch, heads, sequence lengths,
strides) stay run-time kernel arguments; head dims, degree, flags and tiles are literals in the source, so a
new sequence length never renders or compiles anything new.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path
from types import ModuleType

import torch

from ..gates import log_gate_floor
from ..reference import EPS
from ..sizes import pow2_at_least
from . import cache
from .cherries import cherries, cherry_features, query_tables
from .templating import environment

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
FORWARD_TEMPLATE = "forward.py.j2"
SCAN_BLOCK = 1024  # state elements per program of the segment scan


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1``: kernels run eagerly in the interpreter (CPU tensors too), nothing compiles."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Value columns per tile are never fewer than this. With 16 columns, fp16 inputs, 64 query rows, 4 warps and 2
# stages, Triton 3.6 on sm_90 miscompiles the quadratic kernel's w @ v product: an out-of-bounds shared-memory read
# (compute-sanitizer), an illegal-address fault for e = 1 and 8, a relative error of 6.6 for e = 16 (GPU run of
# 2026-11-29, .scratch/small_e_sweep.py); bf16 inputs and 32-column tiles were right in every variant.
MIN_VALUE_TILE = 32


def value_tile(e: int) -> int:
    """The padded value width of the tiles: the power of 2 at or above ``e``, at least ``MIN_VALUE_TILE``."""
    return max(MIN_VALUE_TILE, pow2_at_least(e))


@dataclass(frozen=True)
class KernelSpec:
    """One shape class of the forward. ``chunked`` False: the quadratic kernel alone (chunk fields unused).

    dtype:          "bfloat16" | "float16" | "float32" (q, k, v); 16-bit inputs run their dots in bf16 with fp32
                    accumulation (bf16 keeps fp32's exponent range: (s q.k)^p of large inputs stays finite),
                    float32 inputs in exact fp32 (``input_precision="ieee"``). float16 reaches the kernels only
                    beside the CUDA state kernel (``codegen="cuda"``); elsewhere it runs as float32
                    (``forward.kernel_inputs``).
    head_dim, value_dim: d and e.
    deg:            the even power p.
    gated, has_valid, causal, chunked: the variant.
    chunk_size:     keys per chunk (chunked path).
    block_t:        query rows per attention program.
    block_k:        keys per step of the attention loop.
    block_s:        keys per step of the state kernel.
    block_e:        value columns per program.
    block_feature:  coordinate-block size b of the state tiles (b x b features per pair of blocks).
    query_t:        the query kernel forms its state product transposed (acc^T += S^T phi(q)^T).
    query_split:    the query kernel takes each pair's b x b features in this many parts (b / query_split
                    coordinates of block I each): smaller copy stages of the state, so more programs fit on an SM
                    (not with ``query_t``).
    den_dot:        the attention loops sum each row's weights by a product with a column of ones (a tensor-core
                    n16 product beside w V) instead of a float32 row sum per key block.
    cherries:       the chunk states' rows in the cherry layout (``cherries.py``: no feature twice across
                    8-coordinate groups), written by the CUDA wgmma state kernel; the query kernel's state loop
                    steps through cherries (not with ``query_t``), and the module has no Triton state kernel.
    packed_squares: deg 2 with bf16 dots only (``with_packed_squares``): the attention loops' unmasked key blocks
                    round q.k to bf16 and square it (gated: times the key's factor, rounded too) in packed bf16x2
                    products, where float32 squares were rounded once. For forwards no backward follows: the
                    backward recomputes float32 squares and takes y and denom as those weights' sums, and its
                    d log_gate (a small difference of such sums) moved 1.2-1.7x further from the oracle (session 55).
    waits_for_states: causal chunked, beside the wgmma state kernel that folds segments (``forward.
                    QUERY_BESIDE_STATES``): the query kernel is launched as that kernel's programmatic dependent, takes
                    its row blocks first chunks first, every head's in turn (the state kernel's segment order), within
                    a chunk its last row blocks (the longest) first, and waits before its state loop until the fold's
                    count for its head and its chunk's segment (``SYNC``) says the chunk's states are written.
    """

    dtype: str
    head_dim: int
    value_dim: int
    deg: int
    gated: bool
    has_valid: bool
    causal: bool
    chunked: bool
    chunk_size: int
    block_t: int
    block_k: int
    block_s: int
    block_e: int
    block_feature: int
    query_t: bool = False
    query_split: int = 1
    den_dot: bool = False
    cherries: bool = False
    packed_squares: bool = False
    waits_for_states: bool = False

    def __post_init__(self) -> None:
        # specs key several memo tables per call: hash once (the generated hash walks all 18 fields every time)
        object.__setattr__(self, "_hash", hash(astuple(self)))

    def __hash__(self) -> int:
        return self._hash

    def template_params(self) -> dict[str, object]:
        """The template's variables: the spec plus the derived literals (a fresh dict; computed once per spec, as
        the launch path reads them several times per call)."""
        return dict(_forward_params(self))

    def summary(self) -> str:
        """One line naming the shape class (the rendered module's docstring starts with it)."""
        flags = [f for f, on in (("gated", self.gated), ("valid", self.has_valid), ("causal", self.causal)) if on]
        path = f"chunked C={self.chunk_size} b={self.block_feature}" if self.chunked else "quadratic (single chunk)"
        path += ", cherry layout" if self.cherries else ""
        path += ", packed squares" if self.packed_squares else ""
        path += ", beside the state kernel" if self.waits_for_states else ""
        return (
            f"d={self.head_dim} e={self.value_dim} deg={self.deg} {self.dtype} {' '.join(flags) or 'plain'}; "
            f"{path}; block_t={self.block_t} block_k={self.block_k} block_s={self.block_s} block_e={self.block_e}"
        )


@functools.lru_cache(maxsize=256)
def with_packed_squares(spec: KernelSpec) -> KernelSpec:
    """``spec`` with ``packed_squares`` where it applies (deg 2, bf16 dots: 16-bit inputs), else ``spec``. Memoized
    per shape class: the replace (its ``__post_init__`` hashes all fields) took 26-35 us of the planned call's 52-109
    on a CPU (T=2048-65536) and 20-32 of 185-225 on an H100's host (T=8192; ``benchmarks/bench_host.py``)."""
    return replace(spec, packed_squares=True) if spec.deg == 2 and spec.dtype != "float32" else spec


@functools.cache
def _forward_params(spec: KernelSpec) -> dict[str, object]:
    """``KernelSpec.template_params``, computed (``dataclasses.asdict`` alone took 0.2 ms of each op call)."""
    d, e, b = spec.head_dim, spec.value_dim, spec.block_feature
    nb = d // b if spec.chunked else 1
    npairs = nb * (nb + 1) // 2
    tiled = cherry_features(d) if spec.cherries else npairs * b * b
    return {
        **asdict(spec),
        "d": d,
        "e": e,
        "d_pad": max(16, pow2_at_least(d)),
        "n_eb": -(-e // spec.block_e),
        "nb": nb,
        "npairs": npairs,
        "fb": b * b,
        "dt": tiled,
        # programs per head, segment and value block of the state kernel: one per pair, or per two cherries
        "state_programs": len(cherries(d)) // 2 if spec.cherries else npairs,
        "n_cherries": len(cherries(d)) if spec.cherries else 0,
        "cherry_tables": query_tables(d) if spec.cherries else {},
        "scan_block": SCAN_BLOCK,
        "scan_s_blocks": -(-tiled * e // SCAN_BLOCK),
        "eps": repr(EPS),
        "gate_floor": repr(log_gate_floor(torch.float32)),
        "summary": spec.summary(),
    }


def render(template: str, spec, interpret: bool = False) -> str:
    """The Triton module source of ``template`` for ``spec`` (deterministic: equal specs give byte-equal sources).

    ``interpret``: the source for ``TRITON_INTERPRET=1``, which runs no inline PTX (the GPU source's ``exp2_ftz``
    is ``tl.exp2`` there)."""
    return environment(TEMPLATE_DIR).get_template(template).render(**spec.template_params(), interpret=interpret)


def render_forward(spec: KernelSpec, interpret: bool = False) -> str:
    """The forward's Triton module source for ``spec`` (``interpret``: the interpreter's, see ``render``)."""
    return render(FORWARD_TEMPLATE, spec, interpret)


def cache_dir() -> Path:
    """The folder of the rendered sources: ``<cache root>/triton`` (see ``cache.py``)."""
    return cache.cache_dir("triton")


def source_path(source: str, kind: str = "forward") -> Path:
    """The cache entry of a source: ``<kind>_<key prefix>.py``, keyed by its content and the versions."""
    return cache_dir() / f"{kind}_{cache.cache_key(source)[:24]}.py"


def _import(path: Path, interpret: bool) -> ModuleType:
    name = f"retention_compile_generated.{path.stem}{'_interpreted' if interpret else ''}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # Triton and Inductor look kernels' modules up by name
    module_spec.loader.exec_module(module)
    return module


def load_forward(spec: KernelSpec) -> tuple[ModuleType, Path]:
    """Render ``spec``, write it to the cache unless an entry with the same content exists, and import it.

    Imported once per process and mode: ``TRITON_INTERPRET=1`` makes ``triton.jit`` build interpreted kernels.
    """
    return load(FORWARD_TEMPLATE, spec)


def load(template: str, spec) -> tuple[ModuleType, Path]:
    """``load_forward`` for any template (the cache entry is named after the template's stem)."""
    return _load(spec, interpreting(), template)


@functools.lru_cache(maxsize=256)
def _load(spec, interpret: bool, template: str = FORWARD_TEMPLATE) -> tuple[ModuleType, Path]:
    source = render(template, spec, interpret)
    path = source_path(source, template.split(".")[0])
    cache.store(path, source.encode())
    return _import(path, interpret), path
