"""Plain NumPy building blocks of ``python -m fastbn demo cnn``: layers, loss, Adam.

Every layer has ``forward(x) -> y``, ``backward(dy) -> dx`` (for the last
forward call) and ``params`` / ``grads`` (lists of arrays, in the same order,
``grads`` filled by ``backward``).  Images are NCHW: ``(N, C, H, W)``.
Convolution is im2col through a strided view (no copy until the one reshape
that feeds the matrix product) followed by one ``matmul``; its backward is
two matrix products and a ``k * k``-term col2im sum.

Batch normalization comes from fastbn, in two styles with one interface
(``__call__``, ``backward``, ``train(mode)``, ``scale``/``offset``,
``dscale``/``doffset``, ``running_mean``/``running_var``,
``state_dict``/``load_state_dict``):

- ``fastbn.BatchNorm`` (the layer; the default style),
- ``TFStyleBatchNorm`` below: ``fbn.moments`` + ``fbn.batch_normalization``
  with the moving averages updated by hand, as the TensorFlow tutorial's
  ``is_training`` switch and update ops do.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import fastbn as fbn


class Conv2D:
    """``k x k`` convolution (cross-correlation, as every deep-learning library),
    ``stride``, zero padding ``pad``.

    ``W``: ``(F, C, k, k)``, ``b``: ``(F,)``.  ``x``: ``(N, C, H, W)`` ->
    ``y``: ``(N, F, Ho, Wo)`` with ``Ho = (H + 2 pad - k) // stride + 1`` (same for W).
    """

    def __init__(self, W, b, stride=1, pad=0):
        self.W, self.b = W, b
        self.stride, self.pad = int(stride), int(pad)
        self.params = [self.W, self.b]
        self.grads = [None, None]

    def forward(self, x):
        N, C, H, W_ = x.shape
        F, _, k, _ = self.W.shape
        p, s = self.pad, self.stride
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
        # (N, C, Ho, Wo, k, k): every k x k window, a view of xp
        win = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::s, ::s]
        Ho, Wo = win.shape[2], win.shape[3]
        # im2col: one row per output position, (N*Ho*Wo, C*k*k), the only copy
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(N * Ho * Wo, C * k * k)
        y = cols @ self.W.reshape(F, -1).T + self.b            # (N*Ho*Wo, F)
        self._saved = (x.shape, cols, Ho, Wo)
        return np.ascontiguousarray(y.reshape(N, Ho, Wo, F).transpose(0, 3, 1, 2))

    def backward(self, dy):
        """``dy``: ``(N, F, Ho, Wo)`` -> ``dx``: ``(N, C, H, W)``; sets dW, db."""
        (N, C, H, W_), cols, Ho, Wo = self._saved
        F, _, k, _ = self.W.shape
        p, s = self.pad, self.stride
        dmat = dy.transpose(0, 2, 3, 1).reshape(N * Ho * Wo, F)
        self.grads = [(dmat.T @ cols).reshape(self.W.shape), dmat.sum(0)]
        dcols = (dmat @ self.W.reshape(F, -1)).reshape(N, Ho, Wo, C, k, k)
        # col2im: window offset (i, j) of output (ho, wo) read input (s*ho + i, s*wo + j)
        dxp = np.zeros((N, C, H + 2 * p, W_ + 2 * p), dy.dtype)
        for i in range(k):
            for j in range(k):
                dxp[:, :, i:i + s * Ho:s, j:j + s * Wo:s] += dcols[..., i, j].transpose(0, 3, 1, 2)
        return dxp[:, :, p:p + H, p:p + W_] if p else dxp


class MaxPool2:
    """2 x 2 max-pooling, stride 2: ``(N, C, H, W)`` -> ``(N, C, H/2, W/2)`` (H, W even).

    The gradient goes to the first maximum of each window (as cuDNN and PyTorch)."""

    params, grads = [], []

    def forward(self, x):
        N, C, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"MaxPool2 needs an even height and width, got {H} x {W}")
        # (N, C, H/2, W/2, 4): the four values of each window on the last axis
        win = x.reshape(N, C, H // 2, 2, W // 2, 2).transpose(0, 1, 2, 4, 3, 5)
        win = win.reshape(N, C, H // 2, W // 2, 4)
        self._arg = win.argmax(-1)[..., None]                  # (N, C, H/2, W/2, 1)
        self._shape = x.shape
        return np.take_along_axis(win, self._arg, -1)[..., 0]

    def backward(self, dy):
        N, C, H, W = self._shape
        dwin = np.zeros((N, C, H // 2, W // 2, 4), dy.dtype)
        np.put_along_axis(dwin, self._arg, dy[..., None], -1)
        return dwin.reshape(N, C, H // 2, W // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(N, C, H, W)


class ReLU:
    """``max(x, 0)``, any shape."""

    params, grads = [], []

    def forward(self, x):
        self._pos = x > 0
        return np.maximum(x, 0)

    def backward(self, dy):
        return dy * self._pos


class Flatten:
    """``(N, ...)`` -> ``(N, prod(...))``."""

    params, grads = [], []

    def forward(self, x):
        self._shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, dy):
        return dy.reshape(self._shape)


class Dense:
    """``x @ W + b``: ``W`` ``(n_in, n_out)``, ``b`` ``(n_out,)``; ``(N, n_in)`` -> ``(N, n_out)``."""

    def __init__(self, W, b):
        self.W, self.b = W, b
        self.params = [self.W, self.b]
        self.grads = [None, None]

    def forward(self, x):
        self._x = x
        return x @ self.W + self.b

    def backward(self, dy):
        self.grads = [self._x.T @ dy, dy.sum(0)]
        return dy @ self.W.T


class BN:
    """Adapter giving a batch-norm object (``fbn.BatchNorm`` or ``TFStyleBatchNorm``)
    the layer interface above: ``params = [scale, offset]``."""

    def __init__(self, bn):
        self.bn = bn
        self.params = [bn.scale, bn.offset]
        self.grads = [None, None]

    def forward(self, x):
        return self.bn(x)

    def backward(self, dy):
        dx = self.bn.backward(dy)
        self.grads = [self.bn.dscale, self.bn.doffset]
        return dx


class TFStyleBatchNorm:
    """Batch norm written as the TensorFlow tutorial writes it (channel axis 1).

    Training (``is_training=True``)::

        mean, var = tf.nn.moments(x, axes)                          # fbn.moments
        pop_mean = decay * pop_mean + (1 - decay) * mean            # the update ops
        pop_var  = decay * pop_var  + (1 - decay) * var * n/(n-1)
        y = tf.nn.batch_normalization(x, mean, var, offset, scale, eps)

    Evaluation: ``tf.nn.batch_normalization(x, pop_mean, pop_var, offset, scale, eps)``.
    ``decay = 1 - momentum``.  The tutorial fed the biased batch variance to
    the moving average; this one uses the unbiased one, as ``fbn.BatchNorm``
    and PyTorch do, so that the two styles compute the same thing.

    TensorFlow would differentiate the graph; here the gradient of the same
    graph is fastbn's ``batch_norm_backward`` (batch statistics) or
    ``batch_norm_infer_backward`` (fixed statistics).  ``x``: ``(N, C, ...)``.
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, dtype=np.float32):
        self.eps, self.decay = float(eps), 1.0 - float(momentum)
        self.scale = np.ones(num_features, dtype)
        self.offset = np.zeros(num_features, dtype)
        self.running_mean = np.zeros(num_features, dtype)
        self.running_var = np.ones(num_features, dtype)
        self.training = True
        self.dscale = self.doffset = None

    # The mode switch is the layer's own: one definition of train(mode) / eval().
    train = fbn.BatchNorm.train
    eval = fbn.BatchNorm.eval

    def __call__(self, x):
        C = len(self.scale)
        axes = (0,) + tuple(range(2, x.ndim))
        shape = (1, C) + (1,) * (x.ndim - 2)                     # broadcasts over axes
        if self.training:
            mean, var = fbn.moments(x, axes, keepdims=True)
            n = x.size // C
            self.running_mean[...] = self.decay * self.running_mean + (1 - self.decay) * mean.ravel()
            unbiased = var.ravel() * (n / (n - 1))
            self.running_var[...] = self.decay * self.running_var + (1 - self.decay) * unbiased
        else:
            mean, var = self.running_mean.reshape(shape), self.running_var.reshape(shape)
        y = fbn.batch_normalization(x, mean, var, self.offset.reshape(shape), self.scale.reshape(shape),
                                    self.eps)
        self._saved = (x, mean.ravel().copy(), var.ravel().copy(), self.scale.copy(), self.training)
        return y

    def backward(self, dy):
        x, mean, var, scale, batch_stats = self._saved
        if batch_stats:
            invstd = 1.0 / np.sqrt(var.astype(np.float64) + self.eps)
            dx, self.dscale, self.doffset = fbn.batch_norm_backward(dy, x, scale, mean, invstd)
        else:
            dx, self.dscale, self.doffset = fbn.batch_norm_infer_backward(dy, x, scale, mean, var,
                                                                          eps=self.eps)
        return dx

    def state_dict(self):
        return {k: getattr(self, k).copy() for k in ("scale", "offset", "running_mean", "running_var")}

    def load_state_dict(self, state):
        for k in ("scale", "offset", "running_mean", "running_var"):
            getattr(self, k)[...] = state[k]


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of ``logits`` ``(N, K)`` against integer ``labels`` ``(N,)``
    and its gradient ``dL/dlogits`` ``(N, K)``.  Returns ``(loss, dlogits)``."""
    z = logits - logits.max(1, keepdims=True)                  # exp cannot overflow
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    n = len(labels)
    loss = -float(logp[np.arange(n), labels].mean(dtype=np.float64))
    d = np.exp(logp)
    d[np.arange(n), labels] -= 1
    return loss, d / n


class Adam:
    """Adam (Kingma & Ba), updating ``params`` (a list of arrays) in place.

    TensorFlow's defaults: ``lr=0.001``, ``beta1=0.9``, ``beta2=0.999``, ``eps=1e-8``."""

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.params, self.lr, self.b1, self.b2, self.eps = params, lr, beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        lr_t = self.lr * np.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * np.square(g)
            p -= (lr_t * m / (np.sqrt(v) + self.eps)).astype(p.dtype)
