"""Chunk size and kernel tiles for one power-retention call, chosen from the GPU it runs on.

(Being built: issue 4. The ``Plan`` type is the contract between planning, the kernels and the report.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """How one call is computed. Chunk size never changes results, only speed (DESIGN.md section 1).

    chunk_size:    tokens per chunk; ``chunk_size >= T`` is the single-chunk (quadratic) path.
    block_t:       chunk rows (queries or keys) handled by one kernel program.
    block_feature: coordinate-block size b: the symmetric state is tiled in (b x b) feature blocks.
    block_e:       value columns handled by one kernel program.
    num_warps, num_stages: Triton launch parameters.
    reason:        the numbers behind the choice, for the report.
    """

    chunk_size: int
    block_t: int = 64
    block_feature: int = 16
    block_e: int = 64
    num_warps: int = 4
    num_stages: int = 2
    reason: str = ""
