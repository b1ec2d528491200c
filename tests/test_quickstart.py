"""The quickstart model compiled with ``backend="retention"`` in a fresh process that never imports
retention_compile itself (the entry point must find the backend), against the oracle-patched eager model."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from retention_compile.testing import oracle_attention

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from tiny_gpt import TinyGPT, loss_fn  # noqa: E402

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from tiny_gpt import TinyGPT, loss_fn
    torch.manual_seed(0)
    model = TinyGPT()
    tokens = torch.randint(0, model.cfg.vocab, (2, 96))
    assert "retention_compile" not in sys.modules
    compiled = torch.compile(model, backend="retention", fullgraph=True, options={"verbose": True})
    logits = compiled(tokens)
    loss_fn(logits, tokens).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    torch.save({"logits": logits.detach(), "grads": grads}, sys.argv[1])
    """
)


def test_quickstart_model_in_fresh_process(tmp_path):
    out = tmp_path / "result.pt"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)], cwd=EXAMPLES, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = re.search(r"(\d+) attention site\(s\) in \d+ graph\(s\): (\d+) rewritten, (\d+) kept", proc.stdout)
    assert summary, proc.stdout
    torch.manual_seed(0)
    model = TinyGPT()
    tokens = torch.randint(0, model.cfg.vocab, (2, 96))
    n_sdpa = model.cfg.layers
    assert summary.groups() == (str(n_sdpa), str(n_sdpa), "0")

    result = torch.load(out)
    with oracle_attention():
        expected = model(tokens)
        loss_fn(expected, tokens).backward()
    torch.testing.assert_close(result["logits"], expected, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["grads"][name], p.grad, rtol=1e-5, atol=1e-5, msg=name)
