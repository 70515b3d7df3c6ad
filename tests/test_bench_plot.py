"""The benchmark's plot, drawn on the CPU from a results JSON."""

import json

import pytest

from gdn_backend.bench import runner


def test_plot_from_json_draws_every_panel(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(shape=s, pool=p, T=t, B=b, copy_us=2.0 * b, ours_us=2.4 * b, torch_us=20.0 * b)
            for s in ("TP1", "TP8") for p in ("fp32", "bf16") for t in (1, 4) for b in (1, 4, 16)]
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"device": "test", "copy_ceiling_tbps": 3.0, "rows": rows}))
    runner.main(["--plot-from", str(results)])
    png = tmp_path / "r.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
