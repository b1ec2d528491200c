"""``python -m retention_compile inspect / explain / check``, the kernel registry and the log output."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import retention_compile.testing
from retention_compile.__main__ import main
from retention_compile.inspection import KernelRecord, capture, compiling, record_kernel, recorded_kernels
from retention_compile.report import Report, SiteRecord

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    '''
    """Three attention sites: one rewritten, two kept (a float bias; is_causal with Tq > Tk)."""
    import sys
    import torch
    import torch.nn.functional as F


    def attention(q, k, bias):
        a = F.scaled_dot_product_attention(q, k, k, is_causal=True)
        b = F.scaled_dot_product_attention(q, k, k, attn_mask=bias)
        c = F.scaled_dot_product_attention(q, k[:, :, :4], k[:, :, :4], is_causal=True)
        return a, b, c


    def run():
        torch.manual_seed(0)
        T = int(sys.argv[1])
        q, k = torch.randn(1, 2, T, 8), torch.randn(1, 2, T, 8)
        bias = torch.randn(T, T)  # an arbitrary additive bias (T5-style): nothing to prove it causal
        torch.compile(attention, backend="retention")(q, k, bias)


    def explain_only():
        """The same sites through rc.explain: the report without compiling."""
        import retention_compile as rc

        q, k = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
        rc.explain(attention, q, k, torch.randn(10, 10))


    if __name__ == "__main__":
        run()
    '''
)


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / "three_sites.py"
    path.write_text(SCRIPT)
    return path


def test_inspect_quickstart_writes_report_and_inductor_cpp(tmp_path, capsys):
    torch._dynamo.reset()
    out = tmp_path / "out"
    # T=96, B=2 as in test_quickstart: the same C++ kernels, so whichever runs first fills Inductor's C++ cache
    status = main(["inspect", str(ROOT / "examples" / "quickstart.py"), "--out", str(out), "--", "--seq", "96"])
    printed = capsys.readouterr().out
    assert status == 0, printed[-3000:]
    assert "OK: compiled model matches the oracle" in printed
    assert f"wrote {out}/" in printed and "inductor/: 2 Inductor output code" in printed

    data = json.loads((out / "report.json").read_text())
    compiled = [s for s in data["sites"] if s["graph"] == max(s["graph"] for s in data["sites"])]
    assert [s["module"] for s in compiled] == ["blocks.0.attn", "blocks.1.attn"]
    for site in compiled:
        assert site["location"].endswith("tiny_gpt.py:44") and site["decision"] == "rewritten"
        assert site["q_shape"] == "(2, 4, 96, 32)" and site["mask"] == ""
        assert site["plan"]["chunk_size"] >= 1 and site["plan"]["reason"]
    assert data["balance"]["best_deg"] == 2 and data["balance"]["ratio_before"] > 0

    inductor = sorted(p.name for p in (out / "inductor").iterdir())
    graph = compiled[0]["graph"]
    assert (
        inductor == [f"g{graph}_backward.py", f"g{graph}_forward.py"] == sorted(data["inductor"][i][9:] for i in (0, 1))
    )
    for name in inductor:
        code = (out / "inductor" / name).read_text()
        assert code.startswith("# Inductor output code") and f"site g{graph}s1 blocks.1.attn" in code
        assert 'extern "C"' in code and "cpp_fused" in code  # Inductor's C++ kernels
    markdown = (out / "report.md").read_text()
    assert "| blocks.0.attn |" in markdown and "## Inductor output code" in markdown and "## Sites" in markdown


def test_explain_lists_each_site_and_logs_decisions(script):
    env = {**os.environ, "TORCH_LOGS": "+retention_compile", "TORCH_TRACE": str(script.parent / "trace")}
    proc = subprocess.run(
        [sys.executable, "-m", "retention_compile", "explain", str(script), "--", "12"],
        capture_output=True,
        text=True,
        env=env,
        cwd=script.parent,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "3 attention site(s) in 1 graph(s): 1 rewritten, 2 kept" in table
    rows = [line for line in table.splitlines() if "three_sites.py:" in line]
    assert len(rows) == 3
    assert "rewritten" in rows[0] and "kept as SDPA" in rows[1] and "kept as SDPA" in rows[2]
    assert "Tq (12) > Tk (4)" in rows[2]
    assert "\nkept g0s1: " in table and "\nkept g0s2: is_causal=True with Tq (12) > Tk (4)" in table  # in full
    # the per-site decisions at INFO and the plan at DEBUG, through torch's log handler
    assert "site 0 at" in proc.stderr and ": rewritten -> causal retention" in proc.stderr
    assert "site 2 at" in proc.stderr and ": kept -> kept as SDPA" in proc.stderr
    assert "site 0 plan: chunk" in proc.stderr and "balance (graph" in proc.stderr
    # and the whole report as a structured-trace artifact (tlparse)
    traces = [p.read_text() for p in (script.parent / "trace").iterdir()]
    assert any('"name": "retention_report"' in t and "three_sites.py" in t for t in traces)


def test_explain_module_function_json_shows_why_sites_are_kept(script, monkeypatch, capsys):
    torch._dynamo.reset()
    monkeypatch.syspath_prepend(str(script.parent))
    assert main(["explain", "three_sites:explain_only", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rewritten, bias, longer = data["sites"]
    assert rewritten["decision"] == "rewritten" and rewritten["plan"]["T"] == 10
    assert bias["decision"] == "kept" and bias["reason"] and bias["plan"] is None
    assert longer["decision"] == "kept" and "Tq (10) > Tk (4)" in longer["reason"]


def test_check_dispatches_to_testing(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(
        retention_compile.testing, "check_script", lambda path, argv: calls.append((path, argv)) or 3, raising=False
    )
    assert main(["check", "model.py", "--", "--seq", "8"]) == 3
    assert calls == [("model.py", ["--seq", "8"])]
    monkeypatch.delattr(retention_compile.testing, "check_script")
    assert main(["check", "model.py"]) == 2
    assert "no retention_compile.testing.check_script" in capsys.readouterr().err


def test_a_failing_target_still_writes_its_report(tmp_path, capsys):
    failing = tmp_path / "failing.py"
    failing.write_text("import sys\nprint('ran', sys.argv[1:])\nraise SystemExit(4)\n")
    assert main(["inspect", str(failing), "--out", str(tmp_path / "o"), "--", "x"]) == 4
    printed = capsys.readouterr().out
    assert "ran ['x']" in printed and "no graph was compiled with backend='retention'" in printed
    assert json.loads((tmp_path / "o" / "report.json").read_text())["sites"] == []


def _site(graph: int, site: int, q: tuple, k: tuple) -> SiteRecord:
    shape = Report.shape
    return SiteRecord(graph, site, "y", "m.py:3", f"layers.{site}", shape(q), shape(k), shape(k), "rewritten", "x", "y")


def test_record_kernel_names_kernels_by_site_and_shape(tmp_path):
    graph = Report(sites=[_site(7, 0, (1, 4, 64, 16), (1, 2, 64, 16)), _site(7, 1, (1, 4, 64, 16), (1, 2, 64, 16))])
    triton_source = "import triton\nimport triton.language as tl\n\nVALUE = 3\n"
    meta = {"q_shape": (1, 4, 64, 16), "k_shape": (1, 2, 64, 16), "plan": {"chunk_size": 64}, "gpu": "H200", "deg": 2}
    with capture(inductor_code=False) as cap:
        with compiling(graph):
            record_kernel("retention_fwd", triton_source, meta)
            record_kernel("retention_fwd", triton_source, meta)  # the same source again: one file
        record_kernel("decode_step", 'extern "C" __global__ void k() {}\n', {"q_shape": (1, 4, 1, 16)}, language="cuda")
        written = cap.write(tmp_path)
    names = sorted(p.name for p in written["kernels"])
    digest = KernelRecord("retention_fwd", triton_source, "triton", {}).digest
    assert names[0] == f"g7s0+g7s1_retention_fwd_1x4x64x16_{digest}.py"
    assert names[1].startswith("unattributed_decode_step_1x4x1x16_") and names[1].endswith(".cu")
    text = (tmp_path / "kernels" / names[0]).read_text()
    assert text.endswith(triton_source)
    header = text[: -len(triton_source)]
    assert "# shape: q (1, 4, 64, 16) k (1, 2, 64, 16)" in header and "# plan: chunk_size=64\n" in header
    assert "# gpu: H200" in header and "# site g7s1: layers.1 at m.py:3" in header and "# deg: 2" in header
    namespace: dict = {}
    exec(compile(text, names[0], "exec"), namespace)  # the header keeps the file importable
    assert namespace["VALUE"] == 3
    assert (tmp_path / "kernels" / names[1]).read_text().startswith("// retention_compile generated cuda kernel")
    assert json.loads((tmp_path / "report.json").read_text())["kernels"][0]["sites"] == ["g7s0", "g7s1"]
    assert any(k.name == "retention_fwd" for k in recorded_kernels())
    with pytest.raises(ValueError, match="language"):
        record_kernel("k", "", language="ptx")


def test_kernel_header_states_plan_and_gpu_spec():
    from retention_compile import hardware
    from retention_compile.planning import Plan

    plan = Plan(chunk_size=1024, reason="the model says so")
    meta = {"q_shape": (2, 4, 4096, 32), "plan": plan, "gpu": hardware.KNOWN["H100-SXM"]}
    header = KernelRecord("fwd", "pass\n", "triton", meta).header()
    assert "# plan: chunk_size=1024 block_t=64 block_feature=16 block_e=64 num_warps=4 num_stages=2" in header
    assert "# plan reason: the model says so\n" in header
    assert "# gpu: NVIDIA H100 80GB HBM3 (cc 9.0, 132 SMs)\n" in header
