"""Parameter descriptions shared by several public docstrings, written once.

A docstring line holding only ``{{name}}`` stands for the entry ``name`` below,
indented like the placeholder.  :func:`fill` substitutes them when the
module defining the docstrings is imported, so ``help()``, doctests and
documentation tools see the whole text.
"""

import re

SHARED = {
    "type_error_backward": """\
TypeError
    Non-float ``x`` or vectors; ``dy`` or ``out`` of another dtype than
    ``x``; a missing (None) required vector; arrays of different families
    in one call; a CPU tensor that requires grad; ``out=`` with Dask
    input; a ``backend`` that does not take ``x``'s family.""",
    "parts_value_error": """\
ValueError
    No parts, a part of another shape, parts with different ``C``.""",
    "example_shards": """\
{{example_batch}}
>>> a, b = x[:1], x[1:]                               # two workers' shards""",
    "module_arguments": """\
{{eps_module}}
{{momentum_module}}
{{affine}}
{{track_running_stats}}
{{device_dtype}}
{{bias}}

Returns
-------
module
    Calling it on ``x`` returns ``y``: a new tensor of ``x``'s shape,
    dtype and memory format (``channels_last`` kept).

Raises
------
ValueError
    PyTorch's: input of the wrong dimension (``expected 4D input (got 3D
    input)``), one value per channel in training, ``eps`` <= 0 in
    training; nothing (``num_batches_tracked`` included) changes first.
RuntimeError
    Double backward through the module (``create_graph=True``).""",
    "example_x": """\
>>> import numpy as np
>>> import fastbn as fbn
>>> x = np.array([[1.0, 10.0], [3.0, 30.0], [1.0, 10.0], [3.0, 30.0]],
...              dtype=np.float32)                    # (N, C) = (4, 2)""",
    "example_batch": """\
>>> import numpy as np
>>> import fastbn as fbn
>>> x = np.array([[1.0, 10.0], [3.0, 30.0], [1.0, 10.0], [3.0, 30.0]],
...              dtype=np.float32)                    # the whole batch, (N, C) = (4, 2)""",
    "affine": """\
affine : bool, optional
    Learnable ``weight`` (scale) and ``bias`` (offset), shape (C,).""",
    "backend": """\
backend : str, optional
    Force a backend (``"numba"``, ``"cython"``, ``"numpy"``, ``"cuda"``,
    ``"dask"``); None: the dispatcher's choice (see :func:`backend_for`).""",
    "backend_cpu": """\
backend : str, optional
    Force a CPU backend (``"numba"``, ``"cython"``, ``"numpy"``); None: the
    dispatcher's choice.""",
    "bias": """\
bias : bool, optional
    PyTorch's keyword: without ``bias`` the module has only ``weight``.""",
    "channel_axis": """\
channel_axis : int, optional
    The axis of ``x`` holding the channels (negative counts from the end).""",
    "channel_axis_shard": """\
channel_axis : int, optional
    The axis of ``x`` holding the channels (1 for NCHW, -1 for NHWC).""",
    "count_part": """\
count : ndarray, shape (C,), float64
    Values per channel.""",
    "device_dtype": """\
device, dtype : optional
    Of the parameters and buffers.  fastbn computes float32 parameters
    with float16/float32 input and float64 with float64 input, on CPU;
    other combinations, devices and transforms go to PyTorch.""",
    "dx_result": """\
dx : array of x's family
    Shape and dtype of ``x`` (``out`` itself when given).""",
    "dy": """\
dy : array_like, shape of x
    The gradient of the loss with respect to ``y``: ``x``'s family, shape
    and dtype (any memory layout).""",
    "dy_shard": """\
dy : array_like, shape of x
    The gradient of the loss with respect to this shard's ``y``: ``x``'s
    family, shape and dtype.""",
    "eps_layer": """\
eps : float, optional
    Added to the variance (>= 0).""",
    "eps_module": """\
eps : float, optional
    Added to the variance (> 0 in training, as PyTorch).""",
    "momentum_train": """\
momentum : float, optional
    Weight of the batch statistics in the update, in [0, 1].""",
    "momentum_module": """\
momentum : float or None, optional
    Weight of each batch in the running statistics, in [0, 1]; None: the
    cumulative average over ``num_batches_tracked``.""",
    "out_y": """\
out : array, optional
    Where to write ``y``: an array of ``x``'s family, shape and dtype.  It
    may be ``x`` itself (in place) or overlap ``x`` in any way.  Not
    supported for Dask input.""",
    "out_dx": """\
out : array, optional
    Where to write ``dx``: an array of ``x``'s family, shape and dtype.  It
    may be ``dy`` or ``x`` itself, or overlap them in any way; it may not
    overlap ``scale``.  Not supported for Dask input.""",
    "scale_backward": """\
scale : array_like, shape (C,) or None
    The forward's ``scale`` (any float dtype); None means ones.""",
    "scale_offset": """\
scale, offset : array_like, shape (C,), optional
    Per-channel affine parameters, any float dtype; None means ones /
    zeros.  Must not overlap ``out`` or the running statistics.""",
    "track_running_stats": """\
track_running_stats : bool, optional
    Keep the ``running_mean``/``running_var`` buffers, shape (C,), updated
    in place in training and used in eval mode.""",
    "x": """\
x : array_like, shape (N, C, ...) or (N, ..., C)
    float16, float32 or float64 data of any shape with ``C`` channels on
    ``channel_axis`` (NCL/NCHW/NCDHW with 1, NHWC or ``(N, C)`` with -1),
    in any memory layout: a NumPy array (or anything ``numpy.asarray``
    takes), CuPy/CUDA array, Dask array or CPU ``torch.Tensor``.  Every
    array argument of the call is of ``x``'s family.""",
    "x_shard": """\
x : array_like, shape (N, C, ...) or (N, ..., C)
    This worker's shard: float16, float32 or float64 data with ``C``
    channels on ``channel_axis``, in any memory layout; a NumPy array (or
    anything ``numpy.asarray`` takes) or a CPU ``torch.Tensor``.  ``N`` may
    differ between workers and may be 0.""",
    "y_result": """\
y : array of x's family
    Shape and dtype of ``x`` (``out`` itself when given).""",
}

_PLACEHOLDER = re.compile(r"^( *)\{\{(\w+)\}\}$", re.M)


def _expand(doc):
    while _PLACEHOLDER.search(doc):   # entries may hold placeholders themselves
        doc = _PLACEHOLDER.sub(
            lambda m: "\n".join(m.group(1) + line if line else line
                                for line in SHARED[m.group(2)].split("\n")), doc)
    return doc


def fill(namespace):
    """Expand the placeholders in the docstrings of the functions and classes (and
    their methods) of a module's ``namespace`` (its ``globals()``)."""
    for obj in list(namespace.values()):
        for target in (obj, getattr(obj, "__wrapped__", None)):
            doc = getattr(target, "__doc__", None)
            if target is not None and isinstance(doc, str) and "{{" in doc:
                target.__doc__ = _expand(doc)
        if isinstance(obj, type):
            for attr in vars(obj).values():
                doc = getattr(attr, "__doc__", None)
                if isinstance(doc, str) and "{{" in doc:
                    attr.__doc__ = _expand(doc)
