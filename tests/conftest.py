"""Test configuration shared by every test module.

Triton kernels are tested on the CPU with Triton's interpreter, which must be
switched on before triton is imported anywhere: this file is loaded first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
