"""A compiled CPU kernel for decode attention that reads KV blocks in place (csrc/paged_decode.cpp).

Built once with torch's C++ extension loader (cached under ~/.cache/torch_extensions); when no
compiler is available, or PAGELLM_ATTENTION=torch, decode attention keeps its pure-torch path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"
_module = None
_failed = False


def load_kernel():
    """The compiled module, or None (disabled, or the build failed: logged once)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    if os.environ.get("PAGELLM_ATTENTION", "auto") == "torch":
        _failed = True
        return None
    try:
        from torch.utils.cpp_extension import load

        _module = load("pagellm_paged_decode", sources=[str(_SOURCE)],
                       extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a build error: the torch path still works
        logger.warning("paged decode kernel unavailable (%s: %s); using the torch path", type(exc).__name__, exc)
        _failed = True
    return _module


if __name__ == "__main__":  # `python -m pagellm.model.layers.paged_decode`: build (or find) the kernel
    logging.basicConfig(level=logging.INFO)
    print("paged decode kernel:", "ready" if load_kernel() is not None else "unavailable (torch path)")
