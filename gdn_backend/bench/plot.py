"""The benchmark's plot: each cell's time over the copy of the same bytes."""

from __future__ import annotations

LABELS = {"ours_us": "gdn_backend", "sglang_us": "SGLang's Triton kernels",
          "vllm_us": "vLLM's Triton verify",
          "flashinfer_us": "FlashInfer", "torch_us": "PyTorch gather-step-scatter",
          "fla_us": "FLA fused_recurrent + gather/scatter",
          "classic_us": "gdn_backend, classic decode",
          "sglang_classic_us": "SGLang's Triton, classic decode",
          "own_copy_us": "copy of the bytes ReplaySSM moves"}


def plot(result: dict, path: str) -> None:
    """Time over the copy of the same bytes against B: a panel per mode, shape, pool and T, a line
    per kernel and peer, 1.0 (the copy) drawn. Needs matplotlib (not on the GPU machine:
    plot there from the JSON with --plot-from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    key = lambda r: (r.get("mode", "decode"), r["shape"], r["pool"])  # noqa: E731
    groups = sorted({key(r) for r in rows})
    tokens = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(len(groups), len(tokens), figsize=(4.2 * len(tokens), 3.2 * len(groups)),
                             squeeze=False, sharex=True)
    for (g, group), (c, T) in ((gi, ti) for gi in enumerate(groups) for ti in enumerate(tokens)):
        ax = axes[g][c]
        cell = sorted((r for r in rows if key(r) == group and r["T"] == T), key=lambda r: r["B"])
        if not cell:
            ax.set_visible(False)
            continue
        for color, (name, label) in enumerate(LABELS.items()):  # one colour a peer throughout
            timed = [r for r in cell if name in r]
            if timed:
                ax.plot([r["B"] for r in timed], [r[name] / r["copy_us"] for r in timed],
                        marker="o", label=label, color=f"C{color}")
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="copy of the same bytes")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        mode, shape, pool = group
        ax.set_title(f"{mode}: {shape} {pool} pool, T={T}", fontsize=10)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("time / copy")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles),
               fontsize=8, bbox_to_anchor=(0.5, 1 - 0.35 / fig.get_figheight()))
    fig.suptitle(f"Pooled GDN steps on {result['device']} (cold L2, CUDA-graph replay; "
                 f"copy ceiling {result['copy_ceiling_tbps']:.2f} TB/s)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
