"""Quickstart: compile a small GPT with ``backend="retention"``, print the rewrite report, check the result
against the same model run eagerly with every attention replaced by the float64 oracle, and train.

    python examples/quickstart.py [--seq 256] [--batch 2] [--steps 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tiny_gpt import TinyGPT, loss_fn

import retention_compile as rc
from retention_compile.testing import oracle_attention


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-12)).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="training steps after the gradient check")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TinyGPT().to(args.device)
    tokens = torch.randint(0, model.cfg.vocab, (args.batch, args.seq), device=args.device)

    print("== rewrite report (rc.explain)")
    print(rc.explain(model, tokens))

    print(f"\n== compiling with backend='retention' on {args.device} (T={args.seq})")
    compiled = torch.compile(model, backend="retention", fullgraph=True)
    start = time.perf_counter()
    logits = compiled(tokens)
    print(f"first call (compile + run): {time.perf_counter() - start:.1f} s")
    with oracle_attention():
        expected = model(tokens)
    error = relative_error(logits, expected)
    print(f"logits vs oracle-patched eager model: max relative error {error:.2e} (tolerance {args.tolerance:.0e})")

    print("\n== one training step: gradients vs the oracle-patched eager model")
    loss_fn(compiled(tokens), tokens).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with oracle_attention():
        loss_fn(model(tokens), tokens).backward()
    grad_error = max(relative_error(grads[name], p.grad) for name, p in model.named_parameters())
    print(f"max relative gradient error over {len(grads)} parameters: {grad_error:.2e}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.zero_grad()
    losses = []
    for _ in range(args.steps + 1):
        loss = loss_fn(compiled(tokens), tokens)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print("training losses:", " ".join(f"{x:.4f}" for x in losses))

    ok = error <= args.tolerance and grad_error <= args.tolerance and losses[-1] < losses[0]
    print("\nOK: compiled model matches the oracle and trains" if ok else "\nFAILED: see the errors above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
