import os

import torch

# The Triton kernels are checked in the interpreter on a CPU-only machine and compiled on a GPU.
# The variable must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
