"""The CuTe DSL kernels (decode.py), their compile cache (compile.py), the tile choice
(heuristics.py) and the launch from a validated call (launch.py). Imported only on CUDA."""
