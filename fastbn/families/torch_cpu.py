"""The ``"torch"`` family: CPU ``torch.Tensor`` arguments, worked on as NumPy views.

A call whose ``x`` is a CPU tensor runs the NumPy path on zero-copy views of
every tensor argument (``x``, ``dy``, ``scale``, ``offset``, ``mean``/``var``/
``invstd``, running statistics, ``out``) and hands the results back as
tensors: new results share memory with the NumPy arrays the kernels wrote
(``torch.from_numpy``), ``out=`` comes back as the caller's tensor object,
running statistics given as tensors are updated in place through their views.
So the memory order of ``x`` (e.g. ``channels_last``) is kept, and nothing is
copied on the way in or out.

What a view cannot honour is refused with a ``TypeError`` naming the argument:
tensors that require grad (fastbn's functions record no autograd graph: the
``fastbn.torch`` modules do), ``bfloat16`` (no NumPy dtype), tensors on
another device, and arrays of another family mixed into the call.  Torch
scalars (0-d tensors) are accepted wherever a number is.  This module is only
imported once the caller has handed fastbn a tensor, so fastbn never imports
torch by itself.
"""

import functools
import inspect
import numbers

import numpy as np
import torch

NAME = "torch"

# Arguments of the public functions that are arrays (or per-channel vectors).
ARRAY_ARGS = frozenset({"x", "dy", "scale", "offset", "mean", "variance", "var", "invstd",
                        "running_mean", "running_var", "out", "moments", "sums", "parts"})


def _describe(v):
    if isinstance(v, torch.Tensor):
        return f"torch.Tensor of dtype {v.dtype}, shape {tuple(v.shape)} on {v.device}"
    return f"{type(v).__module__.split('.')[0]}.{type(v).__name__}"


def view(v, name):
    """The NumPy view of CPU tensor ``v`` (no copy), or a ``TypeError`` naming ``name``.

    ``Tensor.numpy()`` itself refuses every tensor this module refuses (grad,
    another device, bfloat16, sparse, conjugate bit), so it is tried first and
    the reasons are sorted out only when it fails (~0.4 us a tensor instead of
    ~3 for the checks up front)."""
    try:
        return v.numpy()
    except (RuntimeError, TypeError) as exc:
        _refuse(v, name, exc)


def _refuse(v, name, exc):
    """Raise the ``TypeError`` naming ``name`` for tensor ``v``, which ``numpy()`` refused."""
    if v.requires_grad:
        raise TypeError(f"{name} is a torch tensor that requires grad; fastbn's functions record "
                        f"no autograd graph: use the fastbn.torch modules (BatchNorm1d/2d/3d) for "
                        f"autograd, or pass {name}.detach()")
    if v.device.type != "cpu":
        raise TypeError(f"{name} is a torch tensor on {v.device} but x is a CPU tensor; "
                        "move it to the same device first")
    if v.dtype == torch.bfloat16:
        raise TypeError(f"{name} has dtype torch.bfloat16, which fastbn does not support "
                        f"(float16, float32 or float64 are): convert it, e.g. {name}.float()")
    if v.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) torch tensor, got layout {v.layout}")
    raise TypeError(f"{name} cannot be viewed as a NumPy array ({exc}); got "
                    f"{_describe(v)}") from exc


def _argument(v, name):
    """A call argument with its tensors replaced by NumPy views.

    Numbers and None pass through; a tuple of tensors (``Moments``,
    ``GradSums``, several ``parts``) is converted member by member; any other
    array (NumPy, CuPy, ...) mixed into a call on CPU tensors is refused.
    """
    if isinstance(v, torch.Tensor):   # first: the ABC check of Number costs ~0.5 us
        if v.dim() == 0 and name not in ("x", "dy", "out"):
            return v.item()
        return view(v, name)
    if v is None or isinstance(v, numbers.Number):
        return v
    if isinstance(v, tuple):
        items = [_argument(e, name) for e in v]
        return type(v)(*items) if hasattr(v, "_fields") else tuple(items)
    raise TypeError(f"{name} is a {_describe(v)} but this call's arrays are CPU torch tensors; "
                    "pass tensors for every array argument (torch.from_numpy() wraps an ndarray "
                    "without a copy)")


def _result(r, out, out_view):
    """A result of the NumPy path as a tensor: ``out`` itself where the NumPy path
    returned ``out``'s view (it hands ``out=`` back as the object it was given)."""
    if isinstance(r, np.ndarray):
        if out is not None and r is out_view:
            return out
        return torch.from_numpy(r)
    if isinstance(r, np.generic):
        return torch.as_tensor(r)
    if isinstance(r, tuple):
        items = [_result(e, out, out_view) for e in r]
        return type(r)(*items) if hasattr(r, "_fields") else tuple(items)
    return r


@functools.lru_cache(maxsize=None)
def wrapped(fn):
    """``fn`` (a public function of the NumPy path) taking and returning CPU tensors;
    made once per function.  Arguments are matched to ``fn``'s parameter names
    by position and keyword without ``inspect.Signature.bind`` (~15 us a call);
    a call that does not fit ``fn``'s signature reaches ``fn`` as it came and
    gets Python's own ``TypeError`` from it."""
    sig = inspect.signature(fn)
    params = sig.parameters.values()
    positional = tuple(p.name for p in params
                       if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    k_out = positional.index("out") if "out" in positional else len(positional)
    if any(p.kind == p.VAR_POSITIONAL for p in params):   # merge_*(*parts): bind them
        return _bound(fn, sig)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if len(args) > len(positional):
            return fn(*args, **kwargs)
        out = args[k_out] if k_out < len(args) else kwargs.get("out")
        args = [_argument(v, n) if n in ARRAY_ARGS else v for v, n in zip(args, positional)]
        for n, v in kwargs.items():
            if n in ARRAY_ARGS:
                kwargs[n] = _argument(v, n)
        res = fn(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return _result(res, None, None)
        return _result(res, out, args[k_out] if k_out < len(args) else kwargs["out"])
    return call


def _bound(fn, sig):
    """wrapped(fn) through ``sig.bind``: for signatures with ``*args``."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        out = bound.arguments.get("out")
        for name, v in bound.arguments.items():
            if name in ARRAY_ARGS:
                bound.arguments[name] = _argument(v, name)
        res = fn(*bound.args, **bound.kwargs)
        return _result(res, out if isinstance(out, torch.Tensor) else None,
                       bound.arguments.get("out"))
    return call
