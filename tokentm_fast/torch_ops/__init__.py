"""The PyTorch twins of the kernel families in ``kernels/``: the same operation, under the same file name.

Each is the kernel's CPU fallback (``backend="torch"``, and float64 on every device) and the oracle its tests
compare the kernel with:

- ``transform_weights``: the token transformation weights (docs/methods.md §2; ``kernels/transform_weights.py``);
- ``head_fusion``: the fusion of the heads' attention and gradient (§3, §4; ``kernels/head_fusion.py``);
- ``row_update``: one layer of the aggregation engine for a block of rows (§3.1; ``kernels/row_update.py``
  and, for the whole matrix, ``kernels/matrix_update.py``); the engine over the layers is
  ``tokentm_fast.aggregation``;
- ``legrad_reduce``: LeGrad's per-layer reduction (§6; ``kernels/legrad_reduce.py``);
- ``attention``: the flash formulation of the explanation attention (``kernels/attention.py``), one block of
  queries at a time: what ``backend="torch"`` runs with ``attention="flash"`` (docs/methods.md §8).

What the kernels define and the twins share (the fusion modes, ε, ``support_bounds``) is in
``tokentm_fast.kernels._utils``.
"""
