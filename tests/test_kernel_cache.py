"""The on-disk kernel cache (``codegen/cache.py``) and its two users: the Triton sources and the CUDA binaries.

Where the root comes from, version keys, an unwritable root (one warning, a temporary directory), truncated
and corrupt entries (rebuilt), two processes filling the same entries at once, and the package imported from
a read-only copy. Runs as root too: an unwritable root is a path below a regular file, which no user can create.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import retention_compile
from retention_compile.codegen import cache, nvrtc, triton_source
from retention_compile.codegen.triton_source import KernelSpec, load_forward, render_forward

PACKAGE_DIR = Path(retention_compile.__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
CUDA_SOURCE = 'extern "C" __global__ void twice(float* x) { x[threadIdx.x] *= 2.0f; }\n'


def spec(value_dim: int = 32) -> KernelSpec:
    """A small chunked shape class; ``value_dim`` tells specs apart."""
    return KernelSpec(
        dtype="float32", head_dim=32, value_dim=value_dim, deg=2, gated=True, has_valid=False, causal=True,
        chunked=True, chunk_size=16, block_t=16, block_k=64, block_s=64, block_e=32, block_feature=16,
    )  # fmt: skip


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache root for one test (through the override variable), nothing imported from it yet."""
    root = tmp_path / "cache"
    monkeypatch.setenv(cache.ENV_VAR, str(root))
    triton_source._load.cache_clear()
    yield root
    triton_source._load.cache_clear()


@pytest.fixture
def fake_compiler(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``nvrtc.compile_source`` replaced by a counter, so the binary cache is tested without a CUDA compiler."""
    calls: list[str] = []

    def compile_source(source: str, arch: str, **_: object) -> bytes:
        calls.append(arch)
        return f"binary of {len(source)} bytes for {arch}".encode() * 8

    monkeypatch.setattr(nvrtc, "compiler_id", lambda compiler=None: "fake-1.0")
    monkeypatch.setattr(nvrtc, "compile_source", compile_source)
    return calls


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python that imports this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(extra)
    return env


def run_python(code: str, env: dict[str, str], cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter in ``cwd``; it prints one JSON line last, which is returned."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_root_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.configured_root() == Path.home() / ".cache" / "retention_compile"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.configured_root() == tmp_path / "xdg" / "retention_compile"
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "override"))
    assert cache.configured_root() == tmp_path / "override"
    assert cache.cache_dir("triton") == tmp_path / "override" / "triton"
    assert cache.cache_dir("triton").is_dir()


def test_keys_include_the_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    tag = cache.versions()
    assert f"torch={torch.__version__}" in tag and "triton=" in tag and "driver=" in tag
    before = cache.cache_key("source")
    monkeypatch.setattr(cache, "versions", lambda: tag.replace("torch=", "torch=0"))
    assert cache.cache_key("source") != before
    assert nvrtc.cache_key("source", "sm_90a", ("-O3",), "nvcc") != nvrtc.cache_key("source", "sm_90", ("-O3",), "nvcc")


def test_unwritable_root_falls_back_to_a_temporary_directory_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(cache.ENV_VAR, str(blocker / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dirs = {kind: cache.cache_dir(kind) for kind in ("triton", "cuda", "triton")}
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "not writable" in messages[0] and cache.ENV_VAR in messages[0]
    assert dirs["triton"].parent == dirs["cuda"].parent != blocker / "cache"
    assert dirs["triton"].is_dir() and os.access(dirs["triton"], os.W_OK)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_root_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(stat.S_IRUSR | stat.S_IXUSR)
    monkeypatch.setenv(cache.ENV_VAR, str(root))
    try:
        with pytest.warns(UserWarning, match="not writable"):
            assert not cache.cache_dir("cuda").is_relative_to(root)
    finally:
        root.chmod(stat.S_IRWXU)


def test_truncated_triton_source_is_rewritten(cache_root: Path) -> None:
    module, path = load_forward(spec())
    assert path.is_relative_to(cache_root)
    path.write_bytes(path.read_bytes()[:100])  # a crash in the middle of a (non-atomic) copy
    triton_source._load.cache_clear()  # as a new process
    again, same = load_forward(spec())
    assert same == path and path.read_text() == render_forward(spec(), triton_source.interpreting())
    assert hasattr(again, "attention_kernel") and hasattr(again, "state_kernel")


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: entry.write_bytes(entry.read_bytes()[:7]),  # truncated
        lambda entry: entry.write_bytes(entry.read_bytes().replace(b"binary", b"BINARY")),  # same length, corrupt
        lambda entry: next(entry.parent.glob(f"*{cache.MARKER_SUFFIX}")).unlink(),  # writer died before the marker
        lambda entry: entry.unlink(),
    ],
    ids=["truncated", "corrupt", "no-marker", "missing"],
)
def test_damaged_binary_is_rebuilt(cache_root: Path, fake_compiler: list[str], damage) -> None:
    binary, entry = nvrtc.cached_compile(CUDA_SOURCE, "sm_90a")
    assert nvrtc.cached_compile(CUDA_SOURCE, "sm_90a") == (binary, entry) and len(fake_compiler) == 1
    damage(entry)
    assert nvrtc.cached_compile(CUDA_SOURCE, "sm_90a") == (binary, entry) and len(fake_compiler) == 2
    assert cache.load_checked(entry) == binary
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted(
        [entry.name, cache.marker_path(entry, binary).name, entry.with_suffix(".cu").name]
    )


FILL_CACHE = """
    import json, pathlib, sys, time
    from retention_compile.codegen import nvrtc, triton_source
    from retention_compile.codegen.triton_source import KernelSpec, load_forward
    base = dict(dtype="float32", head_dim=32, deg=2, gated=True, has_valid=False, causal=True, chunked=True,
                chunk_size=16, block_t=16, block_k=64, block_s=64, block_e=32, block_feature=16)
    source, ready = SOURCE, pathlib.Path(sys.argv[1])
    (ready / sys.argv[3]).touch()
    while len(list(ready.iterdir())) < 2:  # both processes begin together, after importing torch
        time.sleep(0.002)
    paths = []
    for e in range(1, 25):
        triton_source._load.cache_clear()
        module, path = load_forward(KernelSpec(value_dim=e, **base))
        assert hasattr(module, "attention_kernel")
        paths.append(str(path))
    binaries = []
    if sys.argv[2] == "1":
        for arch in ("sm_80", "sm_90a"):
            binary, entry = nvrtc.cached_compile(source, arch, compiler="nvcc")
            binaries.append([str(entry), binary.hex()])
    print(json.dumps({"paths": paths, "binaries": binaries}))
"""


def _have_nvcc() -> bool:
    try:
        return nvrtc.compiler_id("nvcc").startswith("nvcc")
    except RuntimeError:
        return False


def test_two_processes_fill_the_same_entries_at_once(tmp_path: Path) -> None:
    """24 Triton sources (and, with nvcc, two CUDA binaries) built by two processes started together."""
    root = tmp_path / "shared"
    env = subprocess_env(**{cache.ENV_VAR: str(root), "TRITON_INTERPRET": "1"})
    code = textwrap.dedent(FILL_CACHE).replace("SOURCE", repr(CUDA_SOURCE))
    with_nvcc = "1" if _have_nvcc() else "0"
    ready = tmp_path / "ready"
    ready.mkdir()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(ready), with_nvcc, str(index)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for index in range(2)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=240)
        assert child.returncode == 0, err.decode()[-4000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert results[0]["paths"] == results[1]["paths"]
    for e, path in enumerate(results[0]["paths"], start=1):
        assert Path(path).read_text() == render_forward(spec(e), interpret=True)  # the children interpret
    for (entry, first), (same, second) in zip(*(r["binaries"] for r in results)):
        # nvcc embeds its temporary paths, so the two binaries may differ; the entry is one of them, vouched for
        assert entry == same and cache.load_checked(Path(entry)) in (bytes.fromhex(first), bytes.fromhex(second))
    assert not list(root.rglob("*.tmp"))


def test_package_on_a_read_only_file_system(tmp_path: Path) -> None:
    """A read-only copy of the package imports, runs the CPU op and renders kernels; it never writes into itself."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE_DIR, site / "retention_compile", ignore=shutil.ignore_patterns("__pycache__"))

    def snapshot() -> list[tuple[str, int]]:
        return sorted((str(p.relative_to(site)), p.stat().st_mtime_ns) for p in site.rglob("*"))

    before = snapshot()
    for path in [site, *site.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "PYTHONDONTWRITEBYTECODE": "1",  # as root the chmod does not stop writes: the snapshot below does
        cache.ENV_VAR: str(tmp_path / "cache"),
    }
    try:
        result = run_python(
            """
            import json, sys
            # as an installed package: no editable-install finder that would point back at the checkout
            sys.meta_path[:] = [f for f in sys.meta_path if not f.__module__.startswith("__editable__")]
            import torch
            import retention_compile as rc
            from retention_compile.codegen.triton_source import KernelSpec, load_forward
            from retention_compile.reference import power_retention_reference
            q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
            error = (rc.power_retention(q, k, v, chunk_size=4) - power_retention_reference(q, k, v)).abs().max()
            spec = KernelSpec(dtype="float32", head_dim=32, value_dim=32, deg=2, gated=False, has_valid=False,
                              causal=True, chunked=False, chunk_size=0, block_t=16, block_k=64, block_s=0,
                              block_e=32, block_feature=0)
            module, path = load_forward(spec)
            print(json.dumps({"package": rc.__file__, "error": float(error), "source": str(path),
                              "kernel": hasattr(module, "attention_kernel")}))
            """,
            env,
            tmp_path,  # not the checkout: ``python -c`` imports from its working directory first
        )
    finally:
        for path in [site, *site.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert Path(result["package"]).is_relative_to(site)
    assert result["error"] < 1e-12 and result["kernel"]
    assert Path(result["source"]).is_relative_to(tmp_path / "cache")
    assert snapshot() == before
