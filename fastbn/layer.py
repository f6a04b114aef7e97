"""``BatchNorm``: a stateful batch-norm layer for NumPy / CuPy networks.

PyTorch's ``BatchNorm{1,2,3}d`` semantics (train/eval, running statistics with
momentum and unbiased running variance, ``num_batches_tracked``,
``momentum=None`` for a cumulative average), Keras's channel-axis freedom
(``channel_axis=1`` for NCHW/NCL, ``-1`` for NHWC and for ``(N, features)``),
and an explicit ``backward`` for hand-written NumPy training loops.

Parameter names follow TensorFlow's ``tf.nn.batch_normalization``: ``scale``
(PyTorch's ``weight``, Keras's ``gamma``) and ``offset`` (``bias``, ``beta``).
"""

# mypy: allow-redefinition
# (the public functions rebind their ArrayLike arguments to the checked arrays)
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import checks, docstrings, fastlane
from .api import (Array, batch_norm_backward, batch_norm_infer, batch_norm_infer_backward,
                  batch_norm_train)
from .dispatch import family_of
from .merge import partial_moments

# Per-channel arrays of the layer, in state_dict order.
_VECTORS = ("scale", "offset", "running_mean", "running_var")
# PyTorch's state-dict names for them.
_TORCH_NAMES = {"weight": "scale", "bias": "offset"}

# |mean| * invstd up to which the mean that batch_norm_train returns (rounded to
# float32) is as good as the float64 one for the backward (train_forward_f64).
_ROUNDED_MEAN_OK = 1.0


def train_forward_f64(x: ArrayLike, scale: ArrayLike | None, offset: ArrayLike | None, *,
                      channel_axis: int, eps: float, running_mean: Array | None,
                      running_var: Array | None, momentum: float,
                      out: Array | None = None) -> tuple[Array, Array, Array]:
    """``batch_norm_train``, returning the batch ``mean``/``invstd`` in float64 for the backward.

    Same arguments and ``y`` as ``batch_norm_train`` (``x`` of any shape, channels
    on ``channel_axis``); ``mean``/``invstd`` are float64 vectors of length C.

    ``batch_norm_train`` rounds them to the per-channel dtype (float32 for float16/32
    data).  The backward uses ``xhat = (x - mean) * invstd``, so rounding the mean by
    ``d`` moves every ``xhat`` by ``d * invstd``, at most ``2**-24 * |mean| * invstd``.
    Where ``|mean| * invstd <= 1`` in every channel that is within one float32 ulp of a
    unit ``xhat`` (no worse than rounding ``xhat`` itself) and the returned values are
    used; otherwise (data with a large mean, where the rounded mean gave dscale off by
    8e-3 at 1e6 + randn) the float64 moments come from one more read of ``x``.
    Calls the fast lane takes (``fastlane.train``) get the kernel's own float64
    statistics instead, whatever the mean: no check, no second read.
    """
    if (type(x) is np.ndarray
            and (r := fastlane.train(x, scale, offset, channel_axis, eps, running_mean, running_var,
                                     momentum, out, f64_stats=True)) is not None):
        return r   # the kernel's own float64 statistics
    y, mean, invstd = batch_norm_train(x, scale, offset, channel_axis=channel_axis, eps=eps,
                                       running_mean=running_mean, running_var=running_var,
                                       momentum=momentum, out=out)
    if family_of(mean) != "numpy":   # device vectors: kept as they are
        return y, mean, invstd
    if mean.dtype != np.float64 and mean.size:
        with np.errstate(invalid="ignore", over="ignore"):
            large = np.abs(mean.astype(np.float64)) * invstd > _ROUNDED_MEAN_OK
        if large.any():
            m = partial_moments(x, channel_axis)
            var = m.m2 / m.count
            with np.errstate(divide="ignore"):
                # invstd 0 where var + eps == 0, as the forward (PyTorch's rule)
                exact = np.where(var + eps > 0, 1.0 / np.sqrt(var + eps), 0.0)
            return y, m.mean, exact
    return y, mean.astype(np.float64), invstd.astype(np.float64)


def _host_value(v):
    """A state-dict value as a host array: torch tensors (any device) and CuPy arrays
    are copied to NumPy; anything else goes through ``np.asarray``."""
    if hasattr(v, "detach") and hasattr(v, "cpu") and hasattr(v, "numpy"):   # torch.Tensor
        return v.detach().cpu().numpy()
    if family_of(v) == "cuda" and hasattr(v, "get"):   # CuPy
        return v.get()
    return np.asarray(v)


class BatchNorm:
    """Batch normalization over every axis of ``x`` except ``channel_axis``.

    ``BatchNorm(C)(x)`` for ``x`` of shape ``(N, C, ...)``; with
    ``channel_axis=-1`` for ``(N, ..., C)``.  In training mode (the default,
    ``train()``) it normalises with the batch's statistics and updates
    ``running_mean``/``running_var`` in place: ``r = (1 - momentum) * r +
    momentum * batch`` (unbiased variance; ``momentum=None`` averages all
    batches seen so far).  In eval mode (``eval()``) it uses the running
    statistics, or the batch's if the layer has none
    (``track_running_stats=False`` at construction).  As in PyTorch, setting
    ``track_running_stats = False`` later stops the updates but eval mode
    keeps using the stored statistics.

    ``backward(dy)`` returns ``dx`` for the last forward call and sets
    ``dscale``/``doffset`` (None when ``affine=False``).  The forward keeps a
    reference to its input until the next forward: do not modify ``x`` in
    place before calling ``backward``.  Pickling or copying the layer carries
    its state (parameters, statistics, settings), not that input.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels (>= 1).
    channel_axis : int, optional
        The axis of the input holding the channels: 1 for ``(N, C)``, NCL,
        NCHW and NCDHW, -1 for ``(N, ..., C)`` (NHWC).
    {{eps_layer}}
    momentum : float or None, optional
        Weight of each batch in the running statistics, in [0, 1]; None: the
        cumulative average over ``num_batches_tracked`` batches.
    affine : bool, optional
        Learn ``scale`` and ``offset`` (else they are None: ones and zeros).
    track_running_stats : bool, optional
        Keep ``running_mean``/``running_var`` (else eval mode uses the batch's
        statistics).
    dtype : dtype, optional
        The data dtype the layer is built for: float16, float32 or float64.
        Its per-channel arrays are float32 for float16, otherwise ``dtype``;
        input of any dtype with the same per-channel dtype is taken (a
        float32 layer takes float16 and float32 input).

    Attributes
    ----------
    scale, offset : array, shape (C,) or None
        The affine parameters (PyTorch's ``weight``/``bias``), per-channel
        dtype; None when ``affine=False``.
    running_mean, running_var : array, shape (C,) or None
        The running statistics (start 0 and 1), updated in place in training.
    num_batches_tracked : int or None
        Training batches seen (None without running statistics).
    training : bool
        Training mode (``train()``) or eval mode (``eval()``).
    dscale, doffset : array, shape (C,) or None
        The parameter gradients of the last ``backward``.

    Raises
    ------
    TypeError
        ``num_features`` or ``channel_axis`` not an int, ``dtype`` not
        float16/32/64, ``eps``/``momentum`` not numbers.
    ValueError
        ``num_features`` < 1, ``eps`` < 0, ``momentum`` outside [0, 1].

    Notes
    -----
    Array families: NumPy input, and CUDA input (CuPy, a Numba device array,
    a PyTorch CUDA tensor).  Parameters live in host memory and move to the
    GPU as CuPy arrays on the first call with CUDA input (that needs CuPy);
    a layer on the GPU then takes only CUDA input.  Dask arrays are refused
    (use the functions).  For CPU ``torch.Tensor`` models use the
    ``fastbn.torch`` modules, which also give autograd.

    Examples
    --------
    >>> import numpy as np
    >>> import fastbn as fbn
    >>> x = np.array([[2.0, 10.0], [4.0, 30.0], [2.0, 10.0], [4.0, 30.0]],
    ...              dtype=np.float32)                    # (N, C) = (4, 2)
    >>> bn = fbn.BatchNorm(2, channel_axis=-1)
    >>> bn(x)                                             # training mode
    array([[-0.999995  , -0.99999994],
           [ 0.999995  ,  0.99999994],
           [-0.999995  , -0.99999994],
           [ 0.999995  ,  0.99999994]], dtype=float32)
    >>> bn.running_mean, bn.running_var, bn.num_batches_tracked
    (array([0.3, 2. ], dtype=float32), array([ 1.0333333, 14.233334 ], dtype=float32), 1)
    >>> dx = bn.backward(np.ones_like(x))                 # sets dscale, doffset
    >>> dx.shape, bn.doffset
    ((4, 2), array([4., 4.], dtype=float32))
    >>> bn.eval()(x)[0]                                   # eval: running statistics
    array([1.6723478, 2.1204915], dtype=float32)
    """

    num_features: int
    channel_axis: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    dtype: np.dtype[Any]
    param_dtype: np.dtype[Any]
    training: bool
    scale: Array | None
    offset: Array | None
    running_mean: Array | None
    running_var: Array | None
    num_batches_tracked: int | None
    dscale: Array | None
    doffset: Array | None
    _family: str
    _saved: tuple[Any, ...] | None

    def __init__(self, num_features: int, *, channel_axis: int = 1, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, dtype: DTypeLike = np.float32) -> None:
        if isinstance(num_features, (bool, np.bool_)) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"num_features must be an int (the number of channels), got {num_features!r}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(channel_axis, numbers.Integral):
            raise TypeError(f"channel_axis must be an int, got {channel_axis!r}")
        try:
            dtype = np.dtype(dtype)
        except TypeError as exc:
            raise TypeError(f"dtype must be float16, float32 or float64, got {dtype!r}") from exc
        if dtype not in checks.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, float32 or float64, got {dtype}")
        self.num_features = int(num_features)
        self.channel_axis = int(channel_axis)
        self.eps = checks.scalar(eps, "eps", low=0.0)
        self.momentum = None if momentum is None else checks.scalar(momentum, "momentum", low=0.0, high=1.0)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = dtype
        self.param_dtype = checks.param_dtype(dtype)
        self.training = True

        C, pdt = self.num_features, self.param_dtype
        self.scale = np.ones(C, pdt) if self.affine else None
        self.offset = np.zeros(C, pdt) if self.affine else None
        self.running_mean = np.zeros(C, pdt) if self.track_running_stats else None
        self.running_var = np.ones(C, pdt) if self.track_running_stats else None
        self.num_batches_tracked = 0 if self.track_running_stats else None
        self.dscale = None
        self.doffset = None
        self._family = "numpy"   # where the per-channel arrays live: "numpy" or "cuda"
        self._saved = None       # what backward needs from the last forward

    # -- mode ------------------------------------------------------------------

    def train(self, mode: bool = True) -> BatchNorm:
        """Training mode (batch statistics, running statistics updated). Returns self.

        ``mode=False`` is :meth:`eval`.
        """
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        """Evaluation mode (running statistics). Returns self."""
        return self.train(False)

    # -- forward ---------------------------------------------------------------

    def __call__(self, x: ArrayLike) -> Array:
        """Normalise ``x`` (any shape with ``num_features`` channels on ``channel_axis``).

        Parameters
        ----------
        x : array_like, shape (N, C, ...) or (N, ..., C)
            NumPy or CUDA data of a dtype with the layer's per-channel dtype
            (float16 or float32 for a float32 layer, float64 for float64).
            Kept (not copied) for :meth:`backward`.

        Returns
        -------
        y : array of x's family
            A new array, shaped like ``x``, in ``x``'s dtype.

        Raises
        ------
        TypeError
            ``x`` of another dtype or of the Dask family; NumPy input to a
            layer whose parameters moved to the GPU; CUDA input without CuPy.
        ValueError
            ``x`` without ``num_features`` channels on ``channel_axis``; one
            value per channel in training.
        """
        x, fam = self._check_input(x)
        self._follow(fam)
        # As PyTorch: batch statistics in training, and in eval mode only when there are
        # no running statistics (switching track_running_stats off after construction
        # keeps the stored ones in use for eval).
        if self.training or self.running_mean is None or self.running_var is None:
            return self._forward_batch_stats(x)
        return self._forward_running_stats(x)

    def _forward_batch_stats(self, x):
        update = (self.training and self.track_running_stats
                  and self.running_mean is not None and self.running_var is not None)
        if update and self.momentum is None:
            momentum = 1.0 / ((self.num_batches_tracked or 0) + 1)   # cumulative average, as PyTorch
        else:
            momentum = self.momentum if update else 0.0
        y, mean, invstd = train_forward_f64(
            x, self.scale, self.offset, channel_axis=self.channel_axis, eps=self.eps,
            running_mean=self.running_mean if update else None,
            running_var=self.running_var if update else None, momentum=momentum)
        if update and self.num_batches_tracked is not None:  # only once the call has succeeded
            self.num_batches_tracked += 1
        # float64 mean/invstd: the backward keeps the forward's accuracy at large means
        self._saved = ("batch", x, self._scale_copy(), mean, invstd)
        return y

    def _forward_running_stats(self, x):
        y = batch_norm_infer(x, self.scale, self.offset, self.running_mean, self.running_var,
                             channel_axis=self.channel_axis, eps=self.eps)
        # Copies: an SGD update or load_state_dict before backward must not change
        # what backward differentiates (the map of this forward call).
        self._saved = ("running", x, self._scale_copy(), self.running_mean.copy(),
                       self.running_var.copy())
        return y

    def _scale_copy(self):
        return None if self.scale is None else self.scale.copy()

    # -- backward --------------------------------------------------------------

    def backward(self, dy: ArrayLike) -> Array:
        """Gradient of a loss through the last forward call.

        After a training-mode forward this is the batch-statistics gradient
        (``batch_norm_backward``, with the batch statistics in float64).  After
        an eval-mode forward the layer was the fixed affine map
        ``y = (x - running_mean) * scale * invstd + offset`` with
        ``invstd = 1/sqrt(running_var + eps)`` (``batch_norm_infer_backward``),
        so ``dx = dy * scale * invstd``.

        Parameters
        ----------
        dy : array_like
            dLoss/dy: the last input's family, shape and dtype.

        Returns
        -------
        dx : array of x's family
            A new array shaped and typed like the last input.  Also sets
            ``dscale`` = dLoss/dscale and ``doffset`` = dLoss/doffset ((C,),
            per-channel dtype; None when ``affine=False``).

        Raises
        ------
        RuntimeError
            No forward call before (also on a copied or unpickled layer).
        TypeError
            ``dy`` of another dtype or family than the last input.
        ValueError
            ``dy`` of another shape than the last input.
        """
        if self._saved is None:
            raise RuntimeError("BatchNorm.backward called before a forward pass (or on a "
                               "copy or unpickled layer, which does not carry the last input)")
        kind, x, scale, a, b = self._saved
        if not (type(dy) is np.ndarray and type(x) is np.ndarray):   # (ndarrays: checked below)
            dy, _ = checks.data_array(dy, "dy", family_of(x))
        if tuple(dy.shape) != tuple(x.shape):
            raise ValueError(f"dy must have the last input's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
        if dy.dtype != x.dtype:
            raise TypeError(f"dy must have the last input's dtype {x.dtype}, got {dy.dtype}")
        if kind == "batch":
            dx, dscale, doffset = batch_norm_backward(dy, x, scale, a, b,
                                                      channel_axis=self.channel_axis)
        else:
            dx, dscale, doffset = batch_norm_infer_backward(dy, x, scale, a, b,
                                                            channel_axis=self.channel_axis,
                                                            eps=self.eps)
        self.dscale, self.doffset = (dscale, doffset) if self.affine else (None, None)
        return dx

    # -- state -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Copies of the layer's state, by name.

        Returns
        -------
        dict
            ``scale``, ``offset`` (if affine), ``running_mean``,
            ``running_var`` (if tracked): copies of the (C,) arrays, in the
            layer's family; ``num_batches_tracked``: an int (if tracked).
        """
        d = {name: getattr(self, name).copy() for name in self._state_vectors()}
        if self.num_batches_tracked is not None:
            d["num_batches_tracked"] = int(self.num_batches_tracked)
        return d

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Copy ``state`` into the layer's existing arrays, in place.

        Arrays are written in place, so references to ``bn.scale`` etc. (an
        optimizer's) stay live.  Everything is checked before anything is
        written.

        Parameters
        ----------
        state : mapping
            What :meth:`state_dict` returns, or a PyTorch BatchNorm's
            ``state_dict()`` (``weight``/``bias`` for ``scale``/``offset``).
            The keys must be exactly the layer's.  Vectors: float arrays of
            shape ``(num_features,)`` (NumPy or CuPy arrays, torch tensors on
            any device), cast to the per-channel dtype; ``num_batches_tracked``
            an int >= 0 (a number or a 0-d array/tensor).

        Raises
        ------
        ValueError
            Missing or unexpected keys, vectors of another shape, a negative
            ``num_batches_tracked``.
        TypeError
            Non-float vectors, a non-integer ``num_batches_tracked``.

        Examples
        --------
        >>> import numpy as np
        >>> import fastbn as fbn
        >>> bn = fbn.BatchNorm(2)
        >>> scale = bn.scale                              # e.g. held by an optimizer
        >>> bn.load_state_dict({"weight": np.array([2.0, 3.0]), "bias": np.zeros(2),
        ...                     "running_mean": np.zeros(2), "running_var": np.ones(2),
        ...                     "num_batches_tracked": 10})   # PyTorch's names
        >>> scale, bn.num_batches_tracked
        (array([2., 3.], dtype=float32), 10)
        """
        state = dict(state)
        torch_style = [k for k in _TORCH_NAMES if k in state]
        if torch_style and not any(v in state for v in _TORCH_NAMES.values()):
            state = {_TORCH_NAMES.get(k, k): v for k, v in state.items()}
        expected = set(self._state_vectors())
        if self.num_batches_tracked is not None:
            expected.add("num_batches_tracked")
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"load_state_dict: state does not match {self!r}: "
                             f"missing keys {missing}, unexpected keys {unexpected}")
        new = {}
        for name in self._state_vectors():
            v = _host_value(state[name])
            if v.dtype.kind != "f":
                raise TypeError(f"load_state_dict: {name} must be a float array, got dtype {v.dtype}")
            if v.shape != (self.num_features,):
                raise ValueError(f"load_state_dict: {name} must have shape ({self.num_features},), "
                                 f"got {v.shape}")
            new[name] = _to_family(np.array(v, dtype=self.param_dtype), self._family)
        nbt = None
        if self.num_batches_tracked is not None:
            nbt = _host_value(state["num_batches_tracked"])
            if nbt.shape != () or nbt.dtype.kind not in "iu":
                raise TypeError(f"load_state_dict: num_batches_tracked must be an int, got {nbt!r}")
            nbt = int(nbt)
            if nbt < 0:
                raise ValueError(f"load_state_dict: num_batches_tracked must be >= 0, got {nbt}")
        for name, v in new.items():
            getattr(self, name)[...] = v
        if nbt is not None:
            self.num_batches_tracked = nbt

    def _state_vectors(self):
        return [name for name in _VECTORS if getattr(self, name) is not None]

    def __getstate__(self):
        # The state, not the last input (or gradients of it): pickle and copy carry
        # the parameters and statistics only; backward needs a new forward.
        d = self.__dict__.copy()
        d["_saved"] = None
        d["dscale"] = d["doffset"] = None
        return d

    # -- input checks and device placement ----------------------------------------

    def _check_input(self, x):
        if type(x) is np.ndarray and self._family == "numpy":   # the common call, cheaply
            nd = x.ndim
            ax = self.channel_axis
            if (-nd <= ax < nd and x.shape[ax] == self.num_features
                    and x.dtype in self._input_dtypes()):
                return x, "numpy"
        fam = family_of(x)
        if fam == "dask":
            raise TypeError("BatchNorm takes NumPy or CUDA (CuPy) arrays, got a dask array; "
                            "use fastbn.batch_norm_train / batch_norm_infer on dask arrays")
        if fam == "torch":
            raise TypeError("x is a torch tensor; fastbn.BatchNorm is a layer for NumPy/CuPy "
                            "networks: use fastbn.torch.BatchNorm1d/2d/3d (torch modules with "
                            "autograd), or pass x.numpy()")
        if fam == "cuda":
            _cupy()   # fail before anything else if the parameters could not follow x
        x, fam = checks.data_array(x, "x")
        if checks.param_dtype(x.dtype) != self.param_dtype:
            ok = [d.name for d in checks.FLOAT_DTYPES if checks.param_dtype(d) == self.param_dtype]
            raise TypeError(f"x has dtype {x.dtype}, but {self!r} has {self.param_dtype} parameters "
                            f"and takes {' or '.join(ok)} input; cast x or build the layer "
                            f"with dtype=numpy.{x.dtype}")
        ax = checks.channel_axis(self.channel_axis, x.ndim)
        if x.shape[ax] != self.num_features:
            raise ValueError(f"x of shape {tuple(x.shape)} has {x.shape[ax]} channels on axis "
                             f"{self.channel_axis} (channel_axis), but the layer was built for "
                             f"num_features={self.num_features}")
        return x, fam

    def _input_dtypes(self):
        """The dtypes of input this layer takes (those whose per-channel dtype is its own)."""
        return _INPUT_DTYPES[self.param_dtype]

    def _follow(self, family):
        """Move the per-channel arrays to ``family`` ("cuda") on first use there."""
        if family == self._family:
            return
        if family != "cuda":
            raise TypeError(f"x is a {family} array, but this layer's parameters are on the GPU "
                            "(it was called with CUDA input before); pass GPU arrays, or load a "
                            "host state_dict into a new layer")
        moved = {name: _to_family(getattr(self, name), "cuda") for name in self._state_vectors()}
        for name, v in moved.items():
            setattr(self, name, v)
        self._family = "cuda"

    def __repr__(self):
        momentum = "None" if self.momentum is None else f"{self.momentum:g}"
        return (f"BatchNorm({self.num_features}, channel_axis={self.channel_axis}, eps={self.eps:g}, "
                f"momentum={momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, dtype={self.dtype.name})")


#: per-channel dtype -> the input dtypes a layer of it takes
_INPUT_DTYPES = {p: tuple(d for d in checks.FLOAT_DTYPES if checks.param_dtype(d) == p)
                 for p in {checks.param_dtype(d) for d in checks.FLOAT_DTYPES}}


def _cupy():
    """The cupy module, imported only once a layer meets CUDA input; TypeError without it."""
    cp = _cupy_module()
    if cp is None:
        raise TypeError("BatchNorm got a CUDA array: its parameters follow the input to the GPU "
                        "as CuPy arrays, and CuPy is not installed (or not usable here)")
    return cp


def _cupy_module():
    """CuPy if usable here, else None (fastbn's CUDA runtime helper)."""
    from .kernels.cuda_runtime import cupy
    return cupy()


def _to_family(v, family):
    """The host array ``v`` itself (family "numpy") or as a CuPy array ("cuda")."""
    return v if family == "numpy" else _cupy().asarray(v)


docstrings.fill(globals())   # the shared parameter descriptions ({{name}} lines)
