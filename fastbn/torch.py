"""``fastbn.torch``: drop-in PyTorch batch-norm modules computed by fastbn.

    import fastbn.torch as fbt
    model = fbt.convert(model)          # every nn.BatchNorm1d/2d/3d -> fastbn's
    bn = fbt.BatchNorm2d(64)            # or build them directly

``BatchNorm1d``/``2d``/``3d`` *are* ``torch.nn.BatchNorm1d``/``2d``/``3d``
(subclasses): the same constructor arguments (``num_features, eps, momentum,
affine, track_running_stats, device, dtype`` and the ``bias`` keyword),
parameters, buffers and state-dict keys (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``), so state dicts
load both ways, ``torch.save``/``torch.load`` work and code that looks for
``isinstance(m, nn.BatchNorm2d)`` still finds them.  Only ``forward``
differs: on CPU tensors it runs fastbn's kernels on zero-copy NumPy views of
the tensors, inside a ``torch.autograd.Function`` whose backward is
``fastbn.batch_norm_backward`` (training, batch statistics) or
``fastbn.batch_norm_infer_backward`` (eval mode, frozen statistics).

What matches PyTorch, exactly as ``torch.nn.BatchNorm*d`` does it:
momentum (``None``: cumulative average over ``num_batches_tracked``),
``track_running_stats=False`` (batch statistics in eval mode too, unless the
buffers exist, e.g. the flag was switched off after construction), the input
checks and their messages (``expected 4D input (got 3D input)``, ``Expected
more than 1 value per channel when training, got input size ...``, eps <= 0
in training), an empty batch (empty output, running statistics untouched,
zero parameter gradients), float16 input with float32 parameters, float64.
``channels_last`` / ``channels_last_3d`` input gives output (and ``dx``) in
the same memory format, without a copy.

Differences, on purpose:

* A bad call changes nothing: the checks run before ``num_batches_tracked``
  is incremented (PyTorch increments it first).
* Statistics are accurate at large means (fastbn's shifted one-pass moments,
  float64 accumulation); the batch mean is kept in float64 for the backward.
* Double backward (``create_graph=True`` and differentiating the gradient
  again) raises a ``RuntimeError`` saying so.

Everything fastbn does not serve goes to PyTorch's own ``F.batch_norm``,
unchanged: CUDA and other non-CPU tensors (fastbn's CUDA backend is not used
from here yet: it would have to run on PyTorch's CUDA stream), bfloat16 and
float16 parameters, dtype combinations PyTorch itself rejects, tensor
subclasses, ``torch.jit`` tracing, ``torch.compile`` and ``torch.func``
transforms and forward-mode AD (``torch.autograd.forward_ad``: inside a
``dual_level``), so export, compilation and tangents see the ordinary op.
``torch.jit.script`` compiles PyTorch's own BatchNorm forward on the
module's parameters and buffers (TorchScript cannot compile fastbn's); the
eager model keeps fastbn's modules.

Importing ``fastbn`` never imports torch; this module does.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import fastbn as fbn

from . import docstrings
from .layer import train_forward_f64

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormFunction", "convert"]

# data dtype -> the parameter/buffer dtype fastbn pairs with it (API.md: float32 for float16)
_PARAM_DTYPE = {torch.float16: torch.float32, torch.float32: torch.float32, torch.float64: torch.float64}

_DOUBLE_BACKWARD = (b"fastbn.torch: the batch-norm backward is not differentiable again (double "
                    b"backward / create_graph=True through BatchNorm); use torch.nn.BatchNorm*d "
                    b"for higher-order gradients")


def _np(t):
    """Zero-copy NumPy view of a CPU tensor (None stays None).  Where the tensor
    requires grad, ``numpy(force=True)``: the view ``.detach().numpy()`` gives, at
    half its cost (~1.4 vs 2.7 us for a Parameter; a BN call takes up to eight).
    (force also resolves a lazy negation by copying, which only a read tensor --
    x, dy, weight, bias -- can carry here: buffers written in place never require
    grad.)"""
    if t is None:
        return None
    return t.numpy(force=True) if t.requires_grad else t.numpy()


def _suggested_format(x):
    """ATen's ``Tensor.suggest_memory_format()`` (c10's ``is_channels_last_strides_2d/3d``):
    channels_last(_3d) when the strides grow C, W, H, (D), N from innermost to
    outermost, contiguous otherwise and in the ambiguous cases."""
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return torch.contiguous_format
    low = 0
    for d in [1] + list(range(x.dim() - 1, 1, -1)) + [0]:
        if sizes[d] == 0 or strides[d] < low or (d == 0 and low == strides[1]):
            return torch.contiguous_format
        low = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _output_like(x):
    """An empty tensor for ``y``, in the layout PyTorch's CPU batch norm gives it:
    contiguous for contiguous ``x`` and for 2-D/3-D input, channels_last(_3d) for
    channels_last(_3d)-contiguous ``x``, else ATen's suggested format; an empty
    batch copies ``x``'s strides."""
    if x.numel() == 0:
        return torch.empty_like(x)
    if x.dim() not in (4, 5) or x.is_contiguous():
        fmt = torch.contiguous_format
    else:
        cl = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        fmt = cl if x.is_contiguous(memory_format=cl) else _suggested_format(x)
    return torch.empty_like(x, memory_format=fmt)


def _dense(x):
    """True if ``x``'s elements fill its memory block exactly (any axis order)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(x.shape, x.stride()) if s > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _grad_like(x):
    """An empty tensor for ``dx``, laid out as PyTorch's: ``x``'s own strides when
    ``x`` is dense, contiguous otherwise (``is_contiguous`` first: ~0.2 us against
    _dense's ~3)."""
    if x.is_contiguous() or _dense(x):
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _once_differentiable(backward):
    """Like ``torch.autograd.function.once_differentiable``, with fastbn's message,
    and also when only a saved tensor (not ``dy``) requires grad."""
    def wrapper(ctx, dy):
        if not torch.is_grad_enabled():   # a plain backward (no create_graph): nothing to guard
            return backward(ctx, dy)
        with torch.no_grad():
            grads = backward(ctx, dy)
        saved = ctx.saved_tensors
        if not (dy.requires_grad or any(t is not None and t.requires_grad for t in saved)):
            return grads
        live = [g for g in grads if g is not None]
        err = torch._C._functions.DelayedError(_DOUBLE_BACKWARD, len(live))
        fakes = []
        for g in live:
            g = g.detach()
            g.requires_grad_(True)
            fakes.append(g)
        out = err(*fakes)
        out = iter(out if isinstance(out, tuple) else (out,))
        return tuple(None if g is None else next(out) for g in grads)
    return wrapper


class BatchNormFunction(torch.autograd.Function):
    """``y = batch_norm(x)`` over every axis of ``x`` but 1, computed by fastbn.

    ``apply(x, weight, bias, running_mean, running_var, training, momentum, eps)``,
    the arguments of ``torch.nn.functional.batch_norm`` (``weight``/``bias``/
    running statistics may be None).  ``x``: a CPU tensor ``(N, C, *)`` of
    float16/32/64 in any strided layout; the per-channel tensors are 1-D of
    length C in the parameter dtype (float32 for float16 ``x``), the running
    statistics contiguous.  ``training=True`` normalises with the batch's
    statistics and updates the running statistics (if given) in place with
    ``momentum`` (unbiased running variance); ``training=False`` uses the
    running statistics.  ``y`` has ``x``'s dtype, shape and memory format.
    The caller (the modules) has checked the arguments; call the modules.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        y, stats = _forward(x, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.training = bool(training)
        ctx.eps = eps
        ctx.empty = x.numel() == 0
        # eval: copies, as a later update of the buffers must not change this call's gradient
        ctx.stats = stats if training else (_np(running_mean).copy(), _np(running_var).copy())
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @_once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = _grad_like(x)
        pdt = _PARAM_DTYPE[x.dtype]
        if ctx.empty:
            C = x.shape[1]
            dscale = torch.zeros(C, dtype=pdt)
            doffset = torch.zeros(C, dtype=pdt)
        else:
            if ctx.training:
                mean, invstd = ctx.stats
                _, dscale, doffset = fbn.batch_norm_backward(_np(dy), _np(x), _np(weight), mean, invstd,
                                                             channel_axis=1, out=dx.numpy())
            else:
                mean, var = ctx.stats
                _, dscale, doffset = fbn.batch_norm_infer_backward(
                    _np(dy), _np(x), _np(weight), mean, var, channel_axis=1, eps=ctx.eps,
                    out=dx.numpy())
            dscale, doffset = torch.from_numpy(dscale), torch.from_numpy(doffset)
        return (dx if need_x else None,
                dscale if need_w and weight is not None else None,
                doffset if need_b and ctx.has_bias else None,
                None, None, None, None, None)


def _forward(x, weight, bias, running_mean, running_var, training, momentum, eps):
    """``(y, stats)``: BatchNormFunction's forward without autograd.  ``stats`` is the
    float64 batch ``(mean, invstd)`` in training (None for an empty batch, whose
    running statistics stay untouched, as PyTorch's), else ``()``."""
    y = _output_like(x)
    if training:
        if x.numel() == 0:
            return y, None
        _, mean, invstd = train_forward_f64(
            _np(x), _np(weight), _np(bias), channel_axis=1, eps=eps,
            running_mean=_np(running_mean), running_var=_np(running_var),
            momentum=momentum, out=y.numpy())
        return y, (mean, invstd)
    fbn.batch_norm_infer(_np(x), _np(weight), _np(bias), _np(running_mean), _np(running_var),
                         channel_axis=1, eps=eps, out=y.numpy())
    return y, ()


def _verify_batch_size(size):
    """F.batch_norm's training check, with its message."""
    values = size[0]
    for s in size[2:]:
        values *= s
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


_forward_ad = getattr(torch.autograd, "forward_ad", None)


def _transforms_active():
    """True under torch.func transforms (vmap, grad), jit tracing/scripting,
    torch.compile, or inside a forward-mode AD ``dual_level`` (the Function has no
    jvp: PyTorch's op carries the tangents)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    if getattr(_forward_ad, "_current_level", -1) >= 0:
        return True
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if compiling is not None and compiling():
        return True
    functorch = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(functorch is not None and functorch())


_PLAIN = (torch.Tensor, nn.Parameter)
_MISSING = object()

# BatchNormFunction.apply less its Python layer (~8 us a call): that layer binds
# default arguments (only for a setup_context, which this Function has not),
# unwraps dead functorch wrappers (done on x below) and routes functorch
# transforms (sent to PyTorch before this is reached).
# Either is missing from some PyTorch release: the public spellings then.
try:
    _node = torch._C._FunctionBase.__dict__["apply"].__get__(None, BatchNormFunction)
except (AttributeError, KeyError):
    _node = BatchNormFunction.apply
_unwrap_if_dead = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", lambda t: t)


def _member(module, store, name):
    """``module.<name>`` from its ``_parameters``/``_buffers`` dict ``store`` without
    ``nn.Module.__getattr__`` (~1 us a lookup, and a forward makes six), or by
    getattr when it lives elsewhere (parametrizations, weight-norm hooks)."""
    value = store.get(name, _MISSING)
    return getattr(module, name) if value is _MISSING else value


def _plain_cpu(t):
    # (is_cpu: t.device builds a torch.device, ~0.5 us per tensor per call)
    return type(t) in _PLAIN and t.is_cpu and t.layout is torch.strided


def _real(v):
    return type(v) is float or type(v) is int or isinstance(v, numbers.Real)


def _served(x, vectors, running, momentum, eps):
    """True if fastbn computes this call; False sends it to F.batch_norm unchanged
    (which then also raises PyTorch's own errors for what it rejects)."""
    if not _plain_cpu(x) or x.dtype not in _PARAM_DTYPE or x.dim() < 2:
        return False
    pdt, shape = _PARAM_DTYPE[x.dtype], (x.shape[1],)
    for t in vectors:
        if t is not None and not (_plain_cpu(t) and t.dtype == pdt and t.shape == shape):
            return False
    for t in running:
        if t is not None and not (_plain_cpu(t) and t.dtype == pdt and t.shape == shape
                                  and t.is_contiguous()):
            return False
    return _real(momentum) and 0.0 <= momentum <= 1.0 and _real(eps) and eps >= 0.0


class _FastBatchNorm:
    """The forward of fastbn's BatchNorm modules (mixed into torch's classes)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():   # TorchScript compiles this branch only
            return self._scripted_forward(input)
        return self._fast_forward(input)

    def _scripted_forward(self, input: torch.Tensor) -> torch.Tensor:
        """What ``torch.jit.script`` compiles: ``torch.nn.BatchNorm*d``'s forward
        (``_BatchNorm.forward`` of PyTorch 2.x, TorchScript-compatible) on this
        module's own parameters and buffers."""
        self._check_input_dim(input)
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:   # cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if use_buffers else None,
                            self.running_var if use_buffers else None, self.weight, self.bias,
                            bn_training, exponential_average_factor, self.eps)

    @torch.jit.unused
    def _fast_forward(self, input):
        if _transforms_active():   # jit tracing, torch.compile, torch.func: PyTorch's own op
            return super().forward(input)
        self._check_input_dim(input)
        training = self.training
        params, buffers = self._parameters, self._buffers
        weight, bias = _member(self, params, "weight"), _member(self, params, "bias")
        running_mean = _member(self, buffers, "running_mean")
        running_var = _member(self, buffers, "running_var")
        # As torch.nn.modules.batchnorm._BatchNorm.forward: batch statistics in training,
        # and in eval mode when there are no buffers; buffers updated only when tracked.
        bn_training = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        momentum = 0.0 if self.momentum is None else self.momentum
        eps = self.eps
        # F.batch_norm's checks, with its messages, before anything changes
        if bn_training:
            _verify_batch_size(input.size())
            if eps <= 0.0:
                raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        elif eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        served = _served(input, (weight, bias), (running_mean, running_var), momentum, eps)
        if served and not bn_training and (running_mean is None or running_var is None):
            served = False   # one buffer set to None: PyTorch's own error
        if not served:
            return super().forward(input)
        if training and self.track_running_stats:
            tracked = _member(self, buffers, "num_batches_tracked")
            if tracked is not None:
                tracked.add_(1)
                if self.momentum is None:   # cumulative moving average
                    momentum = 1.0 / float(tracked)
        input = _unwrap_if_dead(input)
        if not torch.is_grad_enabled() or not (input.requires_grad or (
                weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)):
            # nothing to differentiate (torch.no_grad(), inference): no autograd node
            # (its creation: ~5 us of a ~16 us _node call on (4, 16, 4, 4), min of 3000)
            return _forward(input, weight, bias, running_mean, running_var, bn_training,
                            float(momentum), float(eps))[0]
        return _node(input, weight, bias, running_mean, running_var,
                     bn_training, float(momentum), float(eps))


class BatchNorm1d(_FastBatchNorm, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` (input ``(N, C)`` or ``(N, C, L)``) computed by fastbn on CPU.

    A subclass of ``torch.nn.BatchNorm1d`` with its constructor, parameters,
    buffers and state-dict keys; only ``forward`` differs (fastbn's kernels
    on zero-copy NumPy views of CPU tensors, with autograd).

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels: input ``(N, C)`` or ``(N, C, L)``.
    {{module_arguments}}

    Examples
    --------
    >>> import torch
    >>> import fastbn.torch as fbt
    >>> bn = fbt.BatchNorm1d(4)
    >>> x = torch.arange(8.0).reshape(2, 4).requires_grad_()
    >>> y = bn(x)                                         # training: batch statistics
    >>> y.detach()
    tensor([[-1.0000, -1.0000, -1.0000, -1.0000],
            [ 1.0000,  1.0000,  1.0000,  1.0000]])
    >>> y.square().sum().backward()
    >>> x.grad.shape, bn.weight.grad.shape, int(bn.num_batches_tracked)
    (torch.Size([2, 4]), torch.Size([4]), 1)
    """


class BatchNorm2d(_FastBatchNorm, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (input ``(N, C, H, W)``, NCHW or channels_last) computed by fastbn.

    A subclass of ``torch.nn.BatchNorm2d`` with its constructor, parameters,
    buffers and state-dict keys; only ``forward`` differs (fastbn's kernels
    on zero-copy NumPy views of CPU tensors, with autograd).

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels: input ``(N, C, H, W)``.
    {{module_arguments}}

    Examples
    --------
    >>> import torch
    >>> import fastbn.torch as fbt
    >>> bn = fbt.BatchNorm2d(3)
    >>> x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    >>> y = bn(x)
    >>> y.shape, y.is_contiguous(memory_format=torch.channels_last)
    (torch.Size([4, 3, 5, 5]), True)
    >>> bn.eval()(x).shape                                # eval: running statistics
    torch.Size([4, 3, 5, 5])
    """


class BatchNorm3d(_FastBatchNorm, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` (input ``(N, C, D, H, W)``, NCDHW or channels_last_3d) by fastbn.

    A subclass of ``torch.nn.BatchNorm3d`` with its constructor, parameters,
    buffers and state-dict keys; only ``forward`` differs (fastbn's kernels
    on zero-copy NumPy views of CPU tensors, with autograd).

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels: input ``(N, C, D, H, W)``.
    {{module_arguments}}

    Examples
    --------
    >>> import torch
    >>> import fastbn.torch as fbt
    >>> bn = fbt.BatchNorm3d(2, dtype=torch.float64)
    >>> bn(torch.randn(2, 2, 3, 3, 3, dtype=torch.float64)).dtype
    torch.float64
    """


_SWAP = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def _swapped(bn):
    """A fastbn module carrying ``bn``'s whole state: the same parameter and buffer
    tensors (so an optimizer built on the model keeps training them, and device/dtype
    stay), settings, training flag and hooks."""
    new = _SWAP[type(bn)].__new__(_SWAP[type(bn)])
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in bn.__dict__.items()})
    return new


def convert(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d``/``2d``/``3d`` in ``module`` with fastbn's.

    Swaps in place (submodules of ``module``) and returns ``module``, or the new
    module when ``module`` itself is a BatchNorm.  The new modules share the old
    ones' parameters and buffers (the same tensors), so state, device, dtype,
    the training flag and an optimizer built before ``convert`` all carry over.
    Only those exact classes are swapped: subclasses (e.g. with their own
    ``forward``), ``SyncBatchNorm`` and lazy modules not yet initialised are left
    alone.  A module that appears several times is swapped once.

    Parameters
    ----------
    module : torch.nn.Module
        A model (modified in place) or a single BatchNorm module.

    Returns
    -------
    torch.nn.Module
        ``module`` itself, or the new module when ``module`` is a BatchNorm.

    Raises
    ------
    TypeError
        ``module`` is not a ``torch.nn.Module``.

    Examples
    --------
    >>> import torch
    >>> import fastbn.torch as fbt
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    >>> weight = model[1].weight
    >>> model = fbt.convert(model)
    >>> type(model[1]).__module__, model[1].weight is weight
    ('fastbn.torch', True)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(module).__name__}")
    memo: dict[int, nn.Module] = {}

    def visit(m):
        if id(m) in memo:
            return memo[id(m)]
        new = _swapped(m) if type(m) in _SWAP else m
        memo[id(m)] = new
        for name, child in list(new._modules.items()):
            if child is not None:
                new._modules[name] = visit(child)
        return new

    return visit(module)


docstrings.fill(globals())   # the shared parameter descriptions ({{name}} lines)
