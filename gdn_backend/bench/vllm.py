"""vLLM's own Triton kernel for MTP verify as a benchmark peer (its per-token slots form).

vLLM does not install on the GPU machine, but the kernel it runs for Qwen3-Next's MTP
verify, `fused_sigmoid_gating_delta_rule_update` in its vendored flash-linear-attention, is
one Triton module that needs only `vllm.triton_utils`. `export` copies it out of an
installed vLLM beside a stand-in for that helper, into a folder that imports as `vllm`:

    python -m gdn_backend.bench.vllm .vllm_kernels     # where vLLM is installed
    PYTHONPATH=$PWD/.vllm_kernels:$PYTHONPATH python -m gdn_backend.bench --modes slots

The benchmark then times it on the slots cells as vLLM's `_forward_core` calls it for a
batch of verifies only: tokens [1, N] with `cu_seqlens`, per-token slots [B, T],
`num_accepted_tokens`, the pool written in place (`inplace_final_state=True`). vLLM hands it
q, k, v made contiguous by its `rearrange_mixed_qkv` copy; the peer gets them so, and the
copy is not timed. Slots <= 0 are its padding (the cells pad with -1 and never use 0).
"""

from __future__ import annotations

import sys

import torch

from .export import export as export_package
from .export import version as package_version

KERNEL_FILES = ("third_party/flash_linear_attention/ops/fused_sigmoid_gating.py",)
KERNEL = "vllm.third_party.flash_linear_attention.ops.fused_sigmoid_gating"
HELPERS = {"triton_utils/__init__.py": "import triton\nimport triton.language as tl\n"}
IN_PLACE = True


def serves(cell) -> bool:
    """vLLM's per-token slots (the benchmark's slots mode)."""
    return cell.mode == "slots"


def export(dest: str) -> str:
    """Write vLLM's verify kernel and the helper stand-in under dest/vllm."""
    return export_package("vllm", KERNEL_FILES, HELPERS, dest)


def version() -> str:
    return package_version("vllm")


def available() -> bool:
    try:
        __import__(KERNEL)
        return True
    except Exception:
        return False


def step(cell):
    """fn(i): vLLM's MTP-verify kernel on slot set i, in place."""
    from vllm.third_party.flash_linear_attention.ops.fused_sigmoid_gating import (
        fused_sigmoid_gating_delta_rule_update)

    tokens = lambda x: x.flatten(0, 1).unsqueeze(0).contiguous()  # noqa: E731
    q, k, v = tokens(cell.q), tokens(cell.k), tokens(cell.v)
    a, b = (x.flatten(0, 1).contiguous() for x in (cell.a, cell.b))
    cu_seqlens = torch.arange(0, cell.B * cell.T + 1, cell.T, dtype=torch.int32,
                              device=cell.q.device)

    def run(i: int) -> None:
        fused_sigmoid_gating_delta_rule_update(
            A_log=cell.A_log, a=a, b=b, dt_bias=cell.dt_bias, q=q, k=k, v=v,
            initial_state=cell.pool, inplace_final_state=True, cu_seqlens=cu_seqlens,
            ssm_state_indices=cell.indices[i], num_accepted_tokens=cell.accepted,
            use_qk_l2norm_in_kernel=True)
    return run


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print("wrote", export(sys.argv[1]))
