"""SGLang's own GDN kernels as a benchmark peer: the kernels this project is to beat.

SGLang does not install on a machine that only runs the benchmark (the GPU machine has no
room for it), but its decode and verify kernels are four Triton modules that need little of
the rest of SGLang. `export` copies them out of an installed SGLang, beside small stand-ins
for the few SGLang helpers they import, into a folder that imports as a package named
`sglang`:

    python -m gdn_backend.bench.sglang DIR          # where SGLang is installed
    PYTHONPATH=DIR:$PYTHONPATH python -m gdn_backend.bench

The benchmark then times SGLang's kernels on every cell, on the pool and slot indices in
place, called as SGLang calls them: decode with the packed kernel (SGLang's default on CUDA)
at T = 1 and the unpacked one for T > 1, where the packed one does not apply; chain verify
and ragged verify with the unpacked kernel on [1, N] tokens, `query_start_loc` and its
intermediate-state buffer; ReplaySSM decode and the spec ring's verify, cursor advance and
fold with their own Triton kernels. Nothing of SGLang is kept in this repository.
"""

from __future__ import annotations

import sys

import torch

from .export import export as export_package
from .export import version as package_version

# The kernel modules, relative to the sglang package (SGLang 0.5.23's layout).
KERNEL_FILES = (
    "kernels/ops/attention/fla/op.py",
    "kernels/ops/attention/fla/utils.py",
    "kernels/ops/attention/fla/fused_recurrent.py",
    "kernels/ops/attention/linear/fused_sigmoid_gating_recurrent.py",
    "kernels/ops/attention/linear/fused_recurrent_linear_replayssm.py",
    "kernels/ops/attention/linear/gdn_replayssm_spec_decode.py",
)
PACKED = "sglang.kernels.ops.attention.fla.fused_recurrent"
UNPACKED = "sglang.kernels.ops.attention.linear.fused_sigmoid_gating_recurrent"
RING = "sglang.kernels.ops.attention.linear.fused_recurrent_linear_replayssm"
SPEC_RING = "sglang.kernels.ops.attention.linear.gdn_replayssm_spec_decode"

# Stand-ins for the SGLang helpers the kernel modules import: device and version queries.
HELPERS = {
    "srt/utils/common.py": (
        "import torch\n"
        "from packaging import version\n"
        "torch_release = version.parse(torch.__version__).release\n"),
    "srt/utils/__init__.py": (
        "import torch\n"
        "def is_hip(): return torch.version.hip is not None\n"
        "def is_cuda(): return torch.version.cuda is not None and torch.cuda.is_available()\n"
        "def get_device_sm():\n"
        "    major, minor = torch.cuda.get_device_capability()\n"
        "    return major * 10 + minor\n"
        "def is_gfx95_supported(): return False\n"
        "def is_sm90_supported(): return is_cuda() and torch.cuda.get_device_capability()[0] == 9\n"),
    "kernels/jit/utils/__init__.py": (
        "import torch\n"
        "def is_arch_support_pdl(): return torch.cuda.get_device_capability()[0] >= 9\n"),
}


def export(dest: str) -> str:
    """Write SGLang's decode and verify kernels and the helper stand-ins under dest/sglang."""
    return export_package("sglang", KERNEL_FILES, HELPERS, dest)


def version() -> str:
    """The exported (or installed) SGLang's version."""
    return package_version("sglang")


def available() -> bool:
    try:
        __import__(PACKED)
        __import__(UNPACKED)
        __import__(RING)
        return True
    except Exception:
        return False


IN_PLACE = True


def serves(cell) -> bool:
    """Decode, chain verify, ragged verify, ReplaySSM decode."""
    return cell.mode in ("decode", "verify", "ragged", "replayssm")


def step(cell):
    """fn(i): SGLang's kernel for the cell's mode on slot set i. Decode: not the unpacked
    kernel at T = 1: called that way it left states far from the packed one's and ours
    (docs/perf_log.md, 2026-12-01), and SGLang does not use it so on CUDA by default."""
    if cell.mode == "decode":
        return packed_decode(cell) if cell.T == 1 else unpacked_decode(cell)
    if cell.mode == "replayssm":
        return replayssm_decode(cell)
    return target_verify(cell)


def packed_decode(cell):
    """fn(i): SGLang's packed decode (T = 1) of cell's batch on slot set i, in place."""
    from sglang.kernels.ops.attention.fla.fused_recurrent import (
        fused_recurrent_gated_delta_rule_packed_decode)

    K = cell.q.shape[-1]
    # SGLang hands this kernel the conv output: q, k and v of a token side by side.
    mixed = cell.mixed[:, 0]
    out = torch.empty(cell.B, 1, cell.HV, cell.v.shape[-1], dtype=cell.out.dtype, device=cell.out.device)
    a, b = cell.a[:, 0], cell.b[:, 0]

    def run(i: int) -> None:
        fused_recurrent_gated_delta_rule_packed_decode(
            mixed_qkv=mixed, a=a, b=b, A_log=cell.A_log, dt_bias=cell.dt_bias, scale=K**-0.5,
            initial_state=cell.pool, out=out, ssm_state_indices=cell.indices[i],
            use_qk_l2norm_in_kernel=True)
    return run


def replayssm_decode(cell):
    """fn(i): SGLang's ReplaySSM decode of cell's batch on slot set i, as its TritonGDNKernel
    calls it with --enable-linear-replayssm: the packed conv rows, the rings, the cursors."""
    from sglang.kernels.ops.attention.linear.fused_recurrent_linear_replayssm import (
        fused_recurrent_gdn_replayssm_decode)

    K = cell.q.shape[-1]
    mixed, a, b = cell.mixed[:, 0], cell.a[:, 0], cell.b[:, 0]
    out = torch.empty(cell.B, 1, cell.HV, cell.v.shape[-1], dtype=cell.out.dtype, device=cell.out.device)

    def run(i: int) -> None:
        fused_recurrent_gdn_replayssm_decode(
            mixed_qkv=mixed, a=a, b=b, A_log=cell.A_log, dt_bias=cell.dt_bias, scale=K**-0.5,
            initial_state=cell.pool, d_cache=cell.ring_d, k_cache=cell.ring_k,
            g_cache=cell.ring_g, out=out, ssm_state_indices=cell.indices[i],
            write_pos=cell.cursors[i], force_flush=cell.force, use_qk_l2norm_in_kernel=True)
    return run


def unpacked_decode(cell):
    """fn(i): SGLang's unpacked decode (every T) of cell's batch on slot set i, in place."""
    from sglang.kernels.ops.attention.linear.fused_sigmoid_gating_recurrent import (
        fused_sigmoid_gating_delta_rule_update)

    K = cell.q.shape[-1]

    def run(i: int) -> None:
        fused_sigmoid_gating_delta_rule_update(
            A_log=cell.A_log, a=cell.a, dt_bias=cell.dt_bias, softplus_beta=1.0,
            softplus_threshold=20.0, q=cell.q, k=cell.k, v=cell.v, b=cell.b,
            initial_state_source=cell.pool, initial_state_indices=cell.indices[i], scale=K**-0.5,
            use_qk_l2norm_in_kernel=True)
    return run


def target_verify(cell):
    """fn(i): SGLang's chain (or ragged) verify on slot set i, as its TritonGDNKernel calls
    it: tokens [1, N], query_start_loc, every token's state to the intermediate buffer,
    the pool left alone."""
    from sglang.kernels.ops.attention.linear.fused_sigmoid_gating_recurrent import (
        fused_sigmoid_gating_delta_rule_update)

    K = cell.q.shape[-1]
    tokens = lambda x: x if cell.cu_seqlens is not None else x.flatten(0, 1).unsqueeze(0)  # noqa: E731
    q, k, v = tokens(cell.q), tokens(cell.k), tokens(cell.v)
    a, b = tokens(cell.a)[0], tokens(cell.b)[0]
    query_start_loc = cell.cu_seqlens
    if query_start_loc is None:
        query_start_loc = torch.arange(0, cell.B * cell.T + 1, cell.T, dtype=torch.int32,
                                       device=cell.q.device)

    def run(i: int) -> None:
        fused_sigmoid_gating_delta_rule_update(
            A_log=cell.A_log, a=a, dt_bias=cell.dt_bias, softplus_beta=1.0,
            softplus_threshold=20.0, q=q, k=k, v=v, b=b, initial_state_source=cell.pool,
            initial_state_indices=cell.indices[i], scale=K**-0.5, use_qk_l2norm_in_kernel=True,
            cu_seqlens=query_start_loc, is_kda=False, disable_state_update=True,
            intermediate_states_buffer=cell.inter, intermediate_state_indices=cell.inter_rows[i],
            cache_steps=cell.T, retrieve_parent_token=None)
    return run


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print("wrote", export(sys.argv[1]))
