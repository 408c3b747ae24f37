"""Child processes that never outlive their parent (Linux: PR_SET_PDEATHSIG)."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """`preexec_fn` for subprocesses: the kernel sends `sig` when the parent dies,
    so a node killed with SIGKILL leaves no orphaned workers or PACS behind."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
