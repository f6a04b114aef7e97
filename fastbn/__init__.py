"""fastbn: fast, accurate batch normalization for NumPy, CuPy, Dask arrays and CPU torch tensors.

    import fastbn as fbn
    y, mean, invstd = fbn.batch_norm_train(x, scale, offset, channel_axis=1)

Results come back in the caller's array family.  The functions' docstrings
state shapes, dtypes and which arguments may share memory; docs/api.md is the
contract; ``fbn.backends()`` says what runs here.  ``fastbn.torch`` holds the
PyTorch modules (and is the only module that imports torch).
"""
if not __import__("os").path.isdir(__import__("os").path.join(__path__[0], "kernels")):
    from ._source_tree import adopt as _adopt  # a source checkout: see fastbn/_source_tree.py
    _adopt(globals())

from .api import (batch_norm_backward, batch_norm_infer, batch_norm_infer_backward, batch_norm_train,
                  batch_normalization, moments)
from .dispatch import backend_for, backends, use_backend
from .layer import BatchNorm
from .merge import (GradSums, Moments, batch_norm_backward_from_sums, batch_norm_train_from_moments,
                    merge_grad_sums, merge_moments, partial_grad_sums, partial_moments)

__version__ = "0.1.0"

__all__ = [
    "moments", "batch_normalization", "batch_norm_train", "batch_norm_infer",
    "batch_norm_backward", "batch_norm_infer_backward", "BatchNorm", "backend_for", "backends", "use_backend",
    # synchronised batch norm (fastbn.merge)
    "Moments", "GradSums", "partial_moments", "merge_moments", "batch_norm_train_from_moments",
    "partial_grad_sums", "merge_grad_sums", "batch_norm_backward_from_sums",
]
