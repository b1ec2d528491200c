"""Relations between (possibly symbolic) sizes, as the rewrite decisions need them."""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true


def holds(condition: bool | torch.SymBool) -> bool:
    """Whether a size relation holds for the graph being compiled.

    A relation proven for every size is true without a guard. Otherwise it is decided at the traced sizes
    and a guard on that outcome is installed (``bool`` of a ``SymBool`` guards): a later call where the
    relation changes recompiles instead of running a rewrite made for other sizes. Dynamo may give q, k and
    v separate length symbols after a recompile, so "Tq == Tk" is often true but not provable."""
    if statically_known_true(condition):
        return True
    return bool(condition)
