"""First-call compile time of a 2-layer Llama-shaped model: ``backend="retention"`` against ``backend="inductor"``.

    python benchmarks/bench_compile.py [--device cpu|cuda] [--repeats 3] [--out benchmarks/results] [--profile]
                                       [--imports] [--dynamic] [--commit SHA]

The model is written here (no transformers): token embedding, two decoder layers of RMSNorm, rotary embeddings,
grouped-query SDPA with ``is_causal=True`` (kv heads repeated as Llama does: expand + reshape) and a SwiGLU MLP,
a final norm and the LM head. The time measured runs from ``torch.compile`` (resolving the backend: for
"inductor" that imports Inductor, for "retention" only this package) through the first call of the compiled
model (Dynamo trace, the backend, Inductor's code generation and compiles, one run), each in a fresh process.

    cold   empty TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR and RETENTION_COMPILE_CACHE
    warm   a second process of the same backend: empty TORCHINDUCTOR_CACHE_DIR, but the Triton and retention
           kernel caches its cold run filled (for inductor only Triton's cache applies)
    hot    a third process with every cache its earlier runs filled, Inductor's included (what a user's second
           run of the same script sees; on CPU the only cache that holds compiled code is Inductor's)

Bars (issue 9): retention cold / inductor cold <= 1.3; a second process with warm caches <= 1.1 (checked for
both "warm" and "hot"). Each figure is the
median of ``--repeats`` runs. The JSON (command, commit, versions, machine, every run) goes to ``--out``, rewritten
after every run (``"complete": false`` until the last). ``--profile`` runs each child under cProfile (slower: compare
such runs with each other only) and keeps its slowest functions by cumulative time, to attribute a gap.
``--imports`` runs each child under ``python -X importtime`` and records, per repeat and warmth, the modules that
only the retention child imported (with their own import seconds): where Python's sources have no cached bytecode,
every such module is compiled in the timed region. ``--dynamic`` compiles both backends with ``dynamic=True``
(``compile_<device>_dynamic_...json``); the bars were set for the default compile and are reported beside it.
There Dynamo hands either backend the model's graph twice in the first call (torch 2.13 CPU, 2026-12-08): first
with one more input, a 0-d tensor for the embedding's float ``norm_type``, then without it.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import command_line, git_commit
from torch import nn

BARS = {"cold": 1.3, "warm": 1.1, "hot": 1.1}
PROFILE_TOP = 40
IMPORTS_TOP = 60


@dataclass(frozen=True)
class LlamaShape:
    """Sizes of the model and of the input batch."""

    vocab: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int
    batch: int
    seq: int
    dtype: str


SHAPES = {
    "cpu": LlamaShape(vocab=2048, hidden=256, heads=8, kv_heads=2, intermediate=688, layers=2, batch=1, seq=256,
                      dtype="float32"),
    "cuda": LlamaShape(vocab=32000, hidden=2048, heads=32, kv_heads=8, intermediate=5632, layers=2, batch=1,
                       seq=2048, dtype="bfloat16"),
}  # fmt: skip


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rotary(seq: int, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (seq, dim) of the rotary embedding."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.outer(torch.arange(seq).float(), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.heads, s.kv_heads, s.hidden // s.heads
        self.q_proj = nn.Linear(s.hidden, s.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(s.hidden, s.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(s.hidden, s.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(s.heads * self.head_dim, s.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        group = self.heads // self.kv_heads
        k = k[:, :, None].expand(B, self.kv_heads, group, T, self.head_dim).reshape(B, self.heads, T, self.head_dim)
        v = v[:, :, None].expand(B, self.kv_heads, group, T, self.head_dim).reshape(B, self.heads, T, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.input_norm, self.post_norm = RMSNorm(s.hidden), RMSNorm(s.hidden)
        self.attn = Attention(s)
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin)
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.embed = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden)
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)
        cos, sin = rotary(s.seq, s.hidden // s.heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def measure(backend: str, device: str, profile: bool = False, dynamic: bool = False) -> dict:
    """In this process: build the model, time the first compiled call, report it (the child side). ``profile``
    runs the timed region under cProfile and adds its ``PROFILE_TOP`` slowest functions (cumulative seconds);
    ``dynamic`` compiles with ``dynamic=True`` (the batch and the sequence length symbolic from the first call)."""
    shape = SHAPES[device]
    torch.manual_seed(0)
    model = Llama(shape).to(device=device, dtype=getattr(torch, shape.dtype)).eval()
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device)
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()  # from torch.compile: resolving backend="inductor" imports Inductor there
    if profiler:
        profiler.enable()
    if backend == "retention":  # what the installed entry point's lookup imports; a checkout registers on import
        import retention_compile  # noqa: F401
    compiled = torch.compile(model, backend=backend, dynamic=dynamic or None)
    with torch.no_grad():
        out = compiled(tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - start
    rewritten = None
    if backend == "retention":
        from retention_compile.backend import PROCESS_REPORT

        rewritten = len(PROCESS_REPORT.rewritten)
    result = {"seconds": seconds, "rewritten_sites": rewritten, "finite": bool(torch.isfinite(out).all())}
    if profiler:
        result["profile"] = slowest_functions(profiler)
    return result


def slowest_functions(profiler: cProfile.Profile) -> dict[str, list[dict]]:
    """The ``PROFILE_TOP`` functions with the most cumulative time (this process's main thread only): over all
    code ("all") and within the retention_compile package ("package")."""
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive, total, cumulative, callers)}
    ranked = sorted(stats.items(), key=lambda item: -item[1][3])
    package = [item for item in ranked if f"{os.sep}retention_compile{os.sep}" in item[0][0]]

    def rows(items: list) -> list[dict]:
        return [
            {"function": f"{Path(file).name}:{line}({name})", "calls": calls, "cumulative_s": round(cumulative, 3)}
            for (file, line, name), (calls, _, _, cumulative, _) in items[:PROFILE_TOP]
        ]

    return {"all": rows(ranked), "package": rows(package)}


def run_child(
    backend: str,
    device: str,
    caches: dict[str, Path],
    profile: bool = False,
    imports: bool = False,
    dynamic: bool = False,
) -> dict:
    """One measurement in a fresh interpreter with the given cache directories. ``imports`` adds the child's
    imported modules (``"imported"``: name -> own import seconds, from ``-X importtime``)."""
    env = {**os.environ, **{name: str(path) for name, path in caches.items()}}
    cmd = [sys.executable, *(["-X", "importtime"] if imports else []), __file__, "--child", backend, "--device", device]
    cmd += (["--profile"] if profile else []) + (["--dynamic"] if dynamic else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{backend} on {device} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if imports:
        result["imported"] = imported_modules(done.stderr)
    return result


def imported_modules(importtime_log: str) -> dict[str, float]:
    """Module name -> its own import seconds, from the lines ``import time: self [us] | cumulative | name``."""
    modules = {}
    for line in importtime_log.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if line.startswith("import time:") and len(fields) == 3 and fields[0].strip().isdigit():
            modules[fields[2].strip()] = int(fields[0]) / 1e6
    return modules


def retention_only_imports(retention: dict[str, float], inductor: dict[str, float]) -> dict:
    """The modules a retention child imported and the inductor child of the same warmth did not: their total own
    import seconds and the ``IMPORTS_TOP`` slowest."""
    extra = sorted(((name, s) for name, s in retention.items() if name not in inductor), key=lambda item: -item[1])
    return {
        "modules": len(extra),
        "seconds": round(sum(s for _, s in extra), 3),
        "slowest": {name: round(s, 4) for name, s in extra[:IMPORTS_TOP]},
    }


def bench(
    device: str, repeats: int, profile: bool, save: Callable[[dict], None], imports: bool = False, dynamic: bool = False
) -> dict:
    """Cold and warm runs of both backends, ``repeats`` times each, alternating backends; ``save`` receives the
    runs so far after each one (a run cut short keeps them). ``imports`` adds ``retention_only_imports`` per
    repeat and warmth."""
    runs: dict[str, list[dict]] = {f"{b}_{w}": [] for b in ("inductor", "retention") for w in BARS}
    extra_imports: dict[str, list[dict]] = {warmth: [] for warmth in BARS}
    for _ in range(repeats):
        imported: dict[str, dict[str, float]] = {}
        for backend in ("inductor", "retention"):
            with tempfile.TemporaryDirectory(prefix="bench_compile_") as tmp:
                kernels = {"TRITON_CACHE_DIR": Path(tmp, "triton"), "RETENTION_COMPILE_CACHE": Path(tmp, "retention")}
                for warmth in BARS:
                    inductor_cache = Path(tmp, "inductor_cold" if warmth == "hot" else f"inductor_{warmth}")
                    caches = {**kernels, "TORCHINDUCTOR_CACHE_DIR": inductor_cache}
                    result = run_child(backend, device, caches, profile, imports, dynamic)
                    if imports:
                        imported[f"{backend}_{warmth}"] = result.pop("imported")
                        if backend == "retention":
                            diff = retention_only_imports(
                                imported[f"retention_{warmth}"], imported[f"inductor_{warmth}"]
                            )
                            extra_imports[warmth].append(diff)
                            print(f"  only retention imported {diff['modules']} modules, {diff['seconds']:.2f} s")
                    runs[f"{backend}_{warmth}"].append(result)
                    print(f"{device} {backend:9} {warmth}: {result['seconds']:.2f} s", flush=True)
                    partial = {"shape": asdict(SHAPES[device]), "runs": runs, "complete": False}
                    save({**partial, **({"retention_only_imports": extra_imports} if imports else {})})
    median = {name: statistics.median(r["seconds"] for r in results) for name, results in runs.items()}
    ratios = {warmth: median[f"retention_{warmth}"] / median[f"inductor_{warmth}"] for warmth in BARS}
    return {
        "shape": asdict(SHAPES[device]),
        "runs": runs,
        **({"retention_only_imports": extra_imports} if imports else {}),
        "complete": True,
        "median_seconds": median,
        "ratios": ratios,
        "bars": BARS,
        "meets_bars": {warmth: ratios[warmth] <= BARS[warmth] for warmth in BARS},
    }


def _versions() -> dict:
    from retention_compile.codegen import cache

    return {"python": platform.python_version(), "torch": torch.__version__, "kernel_cache_key": cache.versions()}


def _machine(device: str) -> dict:
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    return machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--profile", action="store_true", help="cProfile every child; keep its slowest functions")
    parser.add_argument("--imports", action="store_true", help="record the modules only retention's children import")
    parser.add_argument("--dynamic", action="store_true", help="compile with dynamic=True (symbolic batch and length)")
    parser.add_argument("--commit", default=None, help="commit of the code (where the tree's git metadata is stale)")
    parser.add_argument("--child", choices=["inductor", "retention"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.device, args.profile, args.dynamic)))
        return
    header = {
        "command": command_line(),
        "commit": git_commit(args.commit),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "machine": _machine(args.device),
        "device": args.device,
        "dynamic": args.dynamic,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = f"{args.device}_dynamic" if args.dynamic else args.device
    path = out / f"compile_{kind}_{datetime.date.today().isoformat()}_{header['commit'][:7]}.json"

    def save(result: dict) -> None:
        path.write_text(json.dumps({**header, **result}, indent=2) + "\n")

    result = bench(args.device, args.repeats, args.profile, save, args.imports, args.dynamic)
    save(result)
    for warmth, ratio in result["ratios"].items():
        verdict = "meets" if result["meets_bars"][warmth] else "MISSES"
        print(f"{warmth}: retention/inductor = {ratio:.2f} ({verdict} the bar {BARS[warmth]})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
