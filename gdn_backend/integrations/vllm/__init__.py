"""vLLM: gdn_backend as Qwen3-Next's (and Qwen3.5's) GDN decode and MTP-verify kernel.

    pip install gdn-backend
    GDN_BACKEND_VLLM=1 vllm serve Qwen/Qwen3-Next-80B-A3B-Instruct

vLLM loads `register()` through its `vllm.general_plugins` entry point in every process
before the model is built. With `GDN_BACKEND_VLLM=1` it registers
`layer.GDNBackendGatedDeltaNetAttention` in place of vLLM's `QwenGatedDeltaNetAttention`
(vLLM's own `PluggableLayer.register_oot`), which runs plain decode and MTP verify on
gdn_backend's op (`ops.py`) and everything else on vLLM's code, layer by layer, with a
log line saying which. Without the variable vLLM is left untouched.

Written against vLLM 0.33.0.
"""

from __future__ import annotations

import os

ENABLE_ENV = "GDN_BACKEND_VLLM"


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV) == "1"


def register() -> None:
    """vLLM general-plugin entry point (group `vllm.general_plugins`): cheap and idempotent
    (vLLM calls it in several places of a process, and refuses a second registration), no
    CUDA work, and nothing at all unless GDN_BACKEND_VLLM=1."""
    if not enabled():
        return
    from vllm.model_executor.custom_op import op_registry_oot

    from .layer import LAYER_NAME, GDNBackendGatedDeltaNetAttention, vllm_gdn

    registered = op_registry_oot.get(LAYER_NAME)
    if registered is GDNBackendGatedDeltaNetAttention:
        return
    if registered is not None:
        raise RuntimeError(
            f"another plugin already replaces vLLM's {LAYER_NAME} ({registered.__module__}."
            f"{registered.__qualname__}); gdn_backend cannot serve it too: unset {ENABLE_ENV}")
    vllm_gdn.QwenGatedDeltaNetAttention.register_oot(GDNBackendGatedDeltaNetAttention)
