"""The benchmark: python -m gdn_backend.bench (runner.py says what it measures and how).

cells.py builds one cell of a mode; timing.py times it under CUDA graphs; one module a
peer (sglang.py, flashinfer.py, torch_step.py, fla.py); tiles.py forces tile shapes;
plot.py draws the results.
"""
