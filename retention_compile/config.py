"""``RetentionConfig``: every policy of the rewrite (DESIGN.md section 2), with its default.

Set from ``torch.compile(model, backend="retention", options={...})``: each key of ``options`` is a
field name below; an unknown key or a bad value raises ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

GatePolicy = Literal["none", "alibi"]
NonCausalPolicy = Literal["retention", "keep"]
SlidingWindowPolicy = Literal["full", "keep"]
CodegenTarget = Literal["auto", "triton", "cuda", "aten"]


@dataclass(frozen=True)
class RetentionConfig:
    """What the ``retention`` backend does with each attention site it finds.

    deg:            even degree p of the weights ``(s q.k)^p``.
    gate:           "none": no gate is added; "alibi": an ALiBi-style bias linear in key position becomes
                    the constant per-head log-gate ``-m_h`` (other sites stay ungated either way).
    non_causal:     "retention": attention with no mask becomes non-causal retention; "keep": kept as SDPA.
    sliding_window: "full": a sliding-window mask becomes full causal retention; "keep": kept as SDPA.
    dropout:        "ignore": ``dropout_p > 0`` is dropped with a report entry (retention has no attention
                    matrix to drop); "keep": such sites are kept as SDPA.
    strict:         raise ``RetentionRewriteError`` instead of keeping a site that cannot be rewritten.
    chunk_size:     None: planned per shape from the GPU (``rc.plan``); an int overrides the plan.
    codegen:        "auto" | "triton" | "cuda" | "aten": which kernels serve CUDA tensors ("aten": the
                    plain PyTorch chunked form everywhere; "triton": the Triton kernels; "cuda": the CUDA
                    C++ chunk-state kernel with the Triton scan and query kernels, raising, naming why,
                    where it cannot serve a call; "auto": per kernel, the one measured faster on first use
                    for the GPU and shape, remembered in the kernel cache).
    rewrite_decode: an SDPA with Tq == 1 and no mask is treated as the decode step of a causal model.
    verbose:        print the rewrite report after each compiled graph.
    """

    deg: int = 2
    gate: GatePolicy = "none"
    non_causal: NonCausalPolicy = "retention"
    sliding_window: SlidingWindowPolicy = "full"
    dropout: Literal["ignore", "keep"] = "ignore"
    strict: bool = False
    chunk_size: int | None = None
    codegen: CodegenTarget = "auto"
    rewrite_decode: bool = True
    verbose: bool = False

    _CHOICES = {
        "gate": ("none", "alibi"),
        "non_causal": ("retention", "keep"),
        "sliding_window": ("full", "keep"),
        "dropout": ("ignore", "keep"),
        "codegen": ("auto", "triton", "cuda", "aten"),
    }

    def __post_init__(self) -> None:
        if isinstance(self.deg, bool) or not isinstance(self.deg, int) or self.deg < 2 or self.deg % 2:
            raise ValueError(f"RetentionConfig.deg must be an even integer >= 2, got {self.deg!r}")
        for name, allowed in self._CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"RetentionConfig.{name} must be one of {allowed}, got {value!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"RetentionConfig.chunk_size must be None or a positive int, got {self.chunk_size!r}")
        for name in ("strict", "rewrite_decode", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RetentionConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | RetentionConfig | None) -> RetentionConfig:
        """Build a config from ``torch.compile``'s ``options`` dict (or pass a config through)."""
        if options is None:
            return cls()
        if isinstance(options, RetentionConfig):
            return options
        if "config" in options and isinstance(options["config"], RetentionConfig):
            rest = {k: v for k, v in options.items() if k != "config"}
            return dataclasses.replace(options["config"], **rest) if rest else options["config"]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown retention option(s) {unknown}; valid options are {sorted(names)}")
        return cls(**options)
