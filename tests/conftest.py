import os

# Triton reads this when a kernel is decorated, so it must be set before any hyla Triton
# module is imported: the Triton kernels then run on CPU tensors through its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
