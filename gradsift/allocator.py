"""Keep freed memory for reuse on CPU: glibc's malloc set up for a training loop.

glibc hands an allocation above its mmap threshold (128 KiB, rising to at most 32 MiB as mapped
blocks are freed) out as a fresh mapping and returns it to the kernel on free; memory freed at
the top of the heap above the trim threshold goes back too. A training step allocates and frees
activation-sized tensors every step, so every step touches freshly mapped memory again: one
minor page fault per 4 KiB page, about 380 000 of them (1.5 GB) per plain step of SmolLM2-135M
with LoRA at B=16, T=128 (``python -m gradsift.bench.step``: the ``page faults`` column).
Raising both thresholds makes malloc keep those pages and reuse them, as PyTorch's CPU tuning
guides get from jemalloc or tcmalloc. The cost: the process keeps its peak heap mapped instead
of shrinking between steps.

``tune_cpu_allocator()`` does this with ``mallopt`` at run time. It changes nothing when the
user already chose (``MALLOC_*_`` or ``GLIBC_TUNABLES`` in the environment, or jemalloc /
tcmalloc in ``LD_PRELOAD``) or when the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MODES = ("tuned", "system")
_USER_CHOICE = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                "GLIBC_TUNABLES")


def user_choice() -> str | None:
    """What in the environment already sets the allocator up, or None."""
    for key in _USER_CHOICE:
        if key in os.environ:
            return key
    preload = os.environ.get("LD_PRELOAD", "")
    for lib in ("jemalloc", "tcmalloc", "mimalloc"):
        if lib in preload:
            return f"LD_PRELOAD={preload}"
    return None


def tune_cpu_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 32,
                       top_pad: int = 64 << 20) -> bool:
    """Set glibc's mmap threshold, trim threshold and top pad (bytes) with ``mallopt``.

    Returns True when glibc accepted all three; False, with nothing changed, when the
    environment already chose (``user_choice``) or the C library has no ``mallopt``.
    """
    chosen = user_choice()
    if chosen is not None:
        logger.debug("allocator left as set by %s", chosen)
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.debug("no glibc mallopt here: allocator left as it is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    cap = (1 << 31) - 1  # mallopt takes an int
    ok = all(mallopt(param, min(value, cap)) == 1 for param, value in (
        (M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold),
        (M_TOP_PAD, top_pad)))
    if not ok:
        logger.warning("glibc refused a malloc setting: the allocator may fault in fresh "
                       "pages every step")
    return ok
