"""The PyTorch twins of the kernel families in ``kernels/``: the same operation, under the same file name.

- ``attention``: the flash formulation of the explanation attention (``kernels/attention.py``), one block of
  queries at a time: what ``backend="torch"`` runs with ``attention="flash"`` (docs/methods.md §8).
"""
