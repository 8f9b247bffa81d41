"""Hand-written kernels of the model, each beside the plain reference it must equal.

The architecture files (``layers.py``, ``moe.py``, ``modeling.py``) say *what* is computed; these
modules say how to compute it fast on CPU, where autograd's generic backward and BLAS's
single-threaded matrix-vector products leave a large share of a step on the table. Every fast
path has a ``*_reference`` beside it written with plain PyTorch ops, and a test under
``tests/model/kernels/`` that checks the two agree (values and gradients):

- ``linear``: ``x @ W.T`` with decoding matvecs split across threads (reference ``F.linear``);
- ``rmsnorm``: fp32 RMSNorm through the fused ATen kernel with a 6-pass backward;
- ``experts``: SwiGLU experts over rows sorted by expert, one matmul per expert group, with a
  backward that writes each expert's gradient straight into the 3-D gradient tensors; plus the
  ``torch._grouped_mm`` path for CUDA;
- ``permute``: gathers whose backward is the inverse gather instead of a scatter-add;
- ``cross_entropy``: the LM head fused with the causal-LM loss, in cache-sized row chunks.

``autocast`` casts the operands of the code above that autocast cannot see (custom ops and
``autograd.Function`` bodies).
"""
