"""The device-side out-of-range flag, one per device.

A kernel that meets a slot index >= P (or an intermediate row past its buffer, a
ReplaySSM cursor or ring row out of range) skips the request and sets this flag instead
of touching memory. Reading it synchronises, so the hot path never does: the host reads
it when it chooses, in a debug check or an explicit call.
"""

from __future__ import annotations

import os

import torch

# Set to 1: every public op reads the flag after an eager call and raises on an error. It
# synchronises, so it is a debugging aid, never the default.
CHECK_INDICES_ENV = "GDN_BACKEND_CHECK_INDICES"

_flags: dict[torch.device, torch.Tensor] = {}


def _canonical(device: torch.device | str | None) -> torch.device:
    device = torch.device("cuda" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def error_flag(device: torch.device | str | None = None) -> torch.Tensor:
    """The [1] int32 flag of `device` (CUDA's current device by default): 0 clean, 1 set.

    Allocated on first use. Call `gdn_backend.warmup` (or this) before CUDA-graph
    capture, so that the allocation happens outside the graph.
    """
    device = _canonical(device)
    flag = _flags.get(device)
    if flag is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "gdn_backend's error flag would be allocated inside CUDA-graph capture; "
                "call gdn_backend.warmup(...) before capturing"
            )
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        _flags[device] = flag
    return flag


def read_error_flag(device: torch.device | str | None = None, *, clear: bool = False) -> bool:
    """Whether an out-of-range index was seen on `device` since the last clear (synchronises)."""
    flag = error_flag(device)
    seen = bool(flag.item())
    if clear:
        flag.zero_()
    return seen


def clear_error_flag(device: torch.device | str | None = None) -> None:
    error_flag(device).zero_()


def raise_if_set(device: torch.device | str | None = None) -> None:
    """Raise IndexError (and clear the flag) if an out-of-range index was seen."""
    if read_error_flag(device, clear=True):
        raise IndexError(
            "gdn_backend: a state index was >= the pool size (or an intermediate index past "
            "its buffer, a ReplaySSM cursor or ring row out of range); that request was "
            "skipped and nothing was written for it"
        )


def check_after_call(device: torch.device) -> None:
    """The debug check every public op ends with: with GDN_BACKEND_CHECK_INDICES=1, outside
    torch.compile, raise_if_set on the call's device."""
    if os.environ.get(CHECK_INDICES_ENV) == "1" and not torch.compiler.is_compiling():
        raise_if_set(device)
