"""SGLang 0.5.23's own GDN attention test kit with gdn_backend selected, against the kit's
reference and against SGLang's Triton backend on the same fixture.

gdn_backend is loaded through SGLang's plugin loader (its `sglang.srt.plugins` entry point,
then SGLang's HookRegistry) and chosen by `--linear-attn-decode-backend gdn_backend`, as a
user chooses it. Qwen3-Next's GDN dims: K = V = 128, TP1 (16/32 heads) and TP8 (2/4), fp32
and bf16 SSM pools.

On the GPU every mode runs twice, with SGLang's `triton` and with `gdn_backend`, on fixtures
built from the same seeds. With GDN_KIT_REPORT=DIR set, the run writes DIR/sglang_kit.json
and DIR/sglang_kit.md: each case's largest error against the kit's reference for both
backends, and between them. On a CPU the kit's fixtures, SGLang's backend selection and its
dispatcher run, with the op's reference path behind them.
"""

import json
import os

import pytest
import torch

from engines import require

require("sglang")

import sglang_kit  # noqa: E402

sglang_kit.install_stand_ins()  # before SGLang's modules import sgl_kernel
require("sglang.srt.layers.attention.linear.gdn_backend")

import sglang_kit_modes as modes  # noqa: E402
from sglang.srt.layers.attention.linear.kernels.gdn_triton import TritonGDNKernel  # noqa: E402
from sglang_kit import Comparisons, use_backend  # noqa: E402

from gdn_backend.integrations.sglang import GDNBackendKernel  # noqa: E402

SSM_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
ACCEPTED = (2, 3)  # tokens of the verify case's two requests that SGLang commits
REPLAY_STEPS = modes.RING + 2  # decode ring steps: past each ring's flush at write_pos L - 1


@pytest.fixture(scope="module", autouse=True)
def plugins():
    sglang_kit.load_plugins()


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    """A Qwen3-Next config per head count, for the plugin's start-up check."""
    return {heads: sglang_kit.write_model_config(tmp_path_factory.mktemp(heads), H, HV,
                                                 sglang_kit.HEAD_DIM)
            for heads, (H, HV) in sglang_kit.HEADS.items()}


@pytest.fixture
def no_gpu_check(monkeypatch):
    """The CPU machine has no GPU; the plugin's start-up check would refuse it."""
    from gdn_backend.integrations import sglang as plugin

    if not torch.cuda.is_available():
        monkeypatch.setattr(plugin, "check_device", lambda: None)


# CPU and GPU: selection, fixtures and the dispatcher against SGLang's real code.

@pytest.mark.parametrize("ssm", SSM_DTYPES)
def test_kit_builds_sglangs_gdn_backend_on_gdn_backend(model_paths, no_gpu_check, ssm):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = sglang_kit.decode_case("TP8")
    with use_backend("gdn_backend", ssm_dtype=SSM_DTYPES[ssm], model_path=model_paths["TP8"]):
        fixture = modes._build(case, device=device)
    dispatcher = fixture.backend.linear_attn_backend.kernel_dispatcher
    assert isinstance(dispatcher.decode_kernel, GDNBackendKernel)
    assert dispatcher.verify_kernel is dispatcher.decode_kernel
    assert dispatcher.supports_packed_decode
    assert isinstance(dispatcher.extend_kernel, TritonGDNKernel)
    assert isinstance(dispatcher.tree_verify_kernel, TritonGDNKernel)
    pool = sglang_kit.ssm_states(fixture)
    assert pool.dtype == SSM_DTYPES[ssm]
    assert pool.shape[1:] == (4, sglang_kit.HEAD_DIM, sglang_kit.HEAD_DIM)


def test_kit_with_triton_keeps_sglangs_kernels():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with use_backend("triton", ssm_dtype=torch.float32):
        fixture = modes._build(sglang_kit.decode_case("TP8"), device=device)
    dispatcher = fixture.backend.linear_attn_backend.kernel_dispatcher
    assert isinstance(dispatcher.decode_kernel, TritonGDNKernel)
    assert isinstance(dispatcher.verify_kernel, TritonGDNKernel)


def test_kit_with_an_explicit_triton_decode_keeps_sglangs_kernels(model_paths):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with use_backend("triton", ssm_dtype=torch.float32, linear_attn_backend="gdn_backend",
                     linear_attn_decode_backend="triton"):
        fixture = modes._build(sglang_kit.decode_case("TP8"), device=device)
    dispatcher = fixture.backend.linear_attn_backend.kernel_dispatcher
    assert isinstance(dispatcher.decode_kernel, TritonGDNKernel)
    assert isinstance(dispatcher.extend_kernel, TritonGDNKernel)


def test_kit_under_sglangs_ragged_verify_builds_our_ragged_verify(model_paths, no_gpu_check,
                                                                  monkeypatch):
    monkeypatch.setenv("SGLANG_RAGGED_VERIFY_MODE", "compact")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with use_backend("gdn_backend", ssm_dtype=torch.float32, model_path=model_paths["TP8"]):
        fixture = modes._build(sglang_kit.verify_case("TP8"), device=device)
    verify = fixture.backend.linear_attn_backend.kernel_dispatcher.verify_kernel
    assert isinstance(verify, GDNBackendKernel) and verify.ragged_verify


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kit's whole forward")
@pytest.mark.parametrize("ssm", SSM_DTYPES)
@pytest.mark.parametrize("heads", sglang_kit.HEADS)
def test_kit_decode_through_sglangs_dispatcher_on_the_cpu(model_paths, no_gpu_check, heads, ssm):
    """SGLang's metadata, pool and dispatcher hand the kit's batch to the op (the reference
    path on a CPU), which matches the kit's own reference."""
    with use_backend("gdn_backend", ssm_dtype=SSM_DTYPES[ssm], model_path=model_paths[heads]), \
            modes.kernel_calls() as calls:
        modes.decode_through_dispatcher(sglang_kit.decode_case(heads), "cpu")
    assert calls == {"GDNBackendKernel.packed_decode": 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kit's whole forward")
@pytest.mark.parametrize("ssm", SSM_DTYPES)
@pytest.mark.parametrize("heads", sglang_kit.HEADS)
def test_kit_replayssm_decode_through_sglangs_metadata_on_the_cpu(model_paths, no_gpu_check,
                                                                  heads, ssm):
    """SGLang's decode ring on the kit's fixture, past a flush: SGLang's pool allocates the
    rings, its metadata keeps the cursors, the op (the reference path on a CPU) matches the
    kit's reference step after step."""
    with use_backend("gdn_backend", ssm_dtype=SSM_DTYPES[ssm], model_path=model_paths[heads],
                     enable_linear_replayssm=True), modes.kernel_calls() as calls:
        flushes = modes.replayssm_decode_steps(sglang_kit.decode_case(heads), REPLAY_STEPS,
                                               "cpu")
    assert flushes >= 3  # every request's ring filled once
    assert calls == {"GDNBackendKernel.packed_decode": REPLAY_STEPS}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kit's whole forward")
@pytest.mark.parametrize("ssm", SSM_DTYPES)
@pytest.mark.parametrize("heads", sglang_kit.HEADS)
def test_kit_replayssm_spec_verify_through_sglangs_backend_on_the_cpu(model_paths, no_gpu_check,
                                                                      heads, ssm):
    """SGLang's spec ring on the kit's verify fixture, rings holding records: SGLang's
    verify method (the plugin's hook serves it; the reference path on a CPU) matches the
    kit's reference, writes no state, and appends the window's records."""
    with use_backend("gdn_backend", ssm_dtype=SSM_DTYPES[ssm], model_path=model_paths[heads],
                     enable_linear_replayssm_spec=True), modes.kernel_calls() as calls:
        modes.replayssm_spec_verify(sglang_kit.verify_case(heads), "cpu")
    assert calls == {"gdn_backend.replayssm_spec_verify": 1}


# GPU: every mode with each backend.

def _decode_padded(heads):
    return modes.decode_in_cuda_graph_with_padding(
        sglang_kit.decode_case(heads, prefix_lens=(9, 10, 11, 12)), capture_bs=4,
        replays=[((14, 15, 16), (1, 2, 3)), ((15, 17), (4, 2)), ((16,), (3,))])


MODES = {
    # mode: (run, the kernel call it must reach with gdn_backend)
    "decode": (lambda heads: modes.kit_decode(sglang_kit.decode_case(heads)),
               "GDNBackendKernel.packed_decode"),
    "decode_cuda_graph": (lambda heads: modes.kit_decode_cuda_graph(
        sglang_kit.decode_case(heads)), "GDNBackendKernel.packed_decode"),
    "decode_cuda_graph_padded": (_decode_padded, "GDNBackendKernel.packed_decode"),
    "chain_verify": (lambda heads: modes.kit_verify(sglang_kit.verify_case(heads)),
                     "GDNBackendKernel.target_verify"),
    "chain_verify_t4": (lambda heads: modes.kit_verify(
        sglang_kit.verify_case(heads, draft_tokens=4, prefix_lens=(5, 9, 12))),
        "GDNBackendKernel.target_verify"),
    "chain_verify_cuda_graph": (lambda heads: modes.kit_verify_cuda_graph(
        sglang_kit.verify_case(heads)), "GDNBackendKernel.target_verify"),
    "chain_verify_commit": (lambda heads: modes.verify_and_commit(
        sglang_kit.verify_case(heads), ACCEPTED), "GDNBackendKernel.target_verify"),
    "tree_verify": (lambda heads: modes.kit_verify(
        sglang_kit.verify_case(heads, prefix_lens=(5, 6), name="gdn_tree_verify"), topk=2),
        "TritonGDNKernel.target_verify"),
    "replayssm_decode": (lambda heads: modes.replayssm_decode_steps(
        sglang_kit.decode_case(heads), REPLAY_STEPS), "GDNBackendKernel.packed_decode"),
    "replayssm_spec_verify": (lambda heads: modes.replayssm_spec_verify(
        sglang_kit.verify_case(heads)), "gdn_backend.replayssm_spec_verify"),
}
# The kit publishes speculative_eagle_topk=1 for every verify case, so SGLang's backend
# builds no tree links and its tree cases run as chains; a tree needs EAGLE's top-k > 1.
FLAGS = {"tree_verify": {"speculative_eagle_topk": 2},
         "replayssm_decode": {"enable_linear_replayssm": True},
         "replayssm_spec_verify": {"enable_linear_replayssm_spec": True}}


class Report:
    def __init__(self):
        self.rows = []

    def write(self, folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "sglang_kit.json"), "w") as f:
            json.dump(self.rows, f, indent=1)
        lines = ["| case | gdn_backend max err | triton max err | gdn_backend vs triton | result |",
                 "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['case']} | {r['gdn_backend']:.2e} | {r['triton']:.2e} | "
                  f"{r['between']:.2e} | {r['result']} |" for r in self.rows]
        with open(os.path.join(folder, "sglang_kit.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def report():
    collected = Report()
    yield collected
    if os.environ.get("GDN_KIT_REPORT") and collected.rows:
        collected.write(os.environ["GDN_KIT_REPORT"])


def _run(backend, heads, ssm, mode, model_paths):
    run, _ = MODES[mode]
    comparisons = Comparisons()
    with use_backend(backend, ssm_dtype=SSM_DTYPES[ssm], model_path=model_paths[heads],
                     **FLAGS.get(mode, {})), \
            modes.kernel_calls() as calls, comparisons.recording():
        try:
            result = run(heads)
            failure = None
        except AssertionError as e:
            result, failure = None, e
    return comparisons, calls, result, failure


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ssm", SSM_DTYPES)
@pytest.mark.parametrize("heads", sglang_kit.HEADS)
def test_kit_mode_passes_with_gdn_backend(model_paths, report, heads, ssm, mode):
    ours, ours_calls, ours_result, ours_failure = _run("gdn_backend", heads, ssm, mode,
                                                       model_paths)
    theirs, _, theirs_result, theirs_failure = _run("triton", heads, ssm, mode, model_paths)
    between = max((sglang_kit.max_error(a, b) for a, b in zip(ours.actuals, theirs.actuals)),
                  default=float("nan"))
    report.rows.append({
        "case": f"{mode} {heads} {ssm}", "gdn_backend": ours.max, "triton": theirs.max,
        "between": between, "checks": len(ours.errors),
        "result": "fail" if ours_failure else "pass",
        "triton_result": "fail" if theirs_failure else "pass",
        "gdn_backend_calls": dict(ours_calls)})
    if ours_failure:
        raise ours_failure
    assert ours_calls[MODES[mode][1]] > 0, f"{MODES[mode][1]} never ran: {dict(ours_calls)}"
    if mode == "tree_verify":
        assert ours_calls["GDNBackendKernel.target_verify"] == 0
    if mode == "decode_cuda_graph_padded":
        assert all((rows == 0).all() for rows in ours_result), "a padding row is not zero"
    assert len(ours.errors) == len(theirs.errors) > 0
    if not theirs_failure:  # the same fixture: ours and SGLang's agree to the kit's tolerance
        kit = modes._kit()
        for a, b in zip(ours.actuals, theirs.actuals):
            torch.testing.assert_close(a, b, atol=kit.GDN_ATOL, rtol=kit.GDN_RTOL)
