import os

# Triton reads this when a kernel is decorated, so it must be set before any Triton module
# is imported: the Triton kernels then run on CPU tensors through its interpreter. Importing
# triton here, right after, also fixes the mode of Triton's own library functions (tl.sum and
# friends are themselves jit functions) no matter what a test does to the variable later.
os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: F401
