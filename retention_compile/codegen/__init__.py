"""Code generation: shape-specialised Triton and CUDA sources, rendered, compiled, cached and launched.

triton_forward(q, k, v, *, scale, deg, log_gate, causal, valid, plan, for_backward=False) -> (y, denom)
                                                                                     the Triton forward
triton_supports(q, k, v, deg, log_gate, valid, causal) -> None | reason              whether it serves a call
triton_backward(grad_y, q, k, v, y, denom, *, scale, deg, log_gate, causal, valid, plan) -> (dq, dk, dv, dg)
"""

from .backward import triton_backward
from .forward import triton_forward, triton_supports

__all__ = ["triton_backward", "triton_forward", "triton_supports"]
