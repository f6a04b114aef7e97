"""Backend kernels of fastbn, one module per backend.

Every backend module exposes the same three primitives on the *canonical view*
that ``fastbn.layout`` builds from any array and channel axis: a 3-D array
``x3`` of shape ``(outer, C, inner)`` whose axis 1 holds the channels and whose
axes 0 and 2 are reduced over.  NCHW becomes ``(N, C, H*W)``, NHWC becomes
``(N*H*W, C, 1)``.  Per-channel vectors are float64 of length C.

``moments3(x3) -> (mean, m2)``
    Per-channel mean and sum of squared deviations ``m2`` (float64), computed in
    one read of ``x3``: per-chunk sums (shifted or two-pass, per backend) whose
    partial (count, mean, m2) are merged exactly.
``affine3(x3, m, q, r, out3, u3=None, p=None)``
    ``out3 = q*(x3 - m) + r  (+ p*u3)`` per channel, evaluated in float64 and
    rounded once to ``out3``'s dtype.  ``out3`` may be ``x3`` itself.  The
    normalize pass (``q = scale*invstd``, ``r = offset``) and the backward's
    elementwise pass (``u3 = dy``) are both this one operation.
``dy_sums3(dy3, x3, m) -> (sum_dy, sum_dy_xc)``
    Per-channel ``sum(dy)`` and ``sum(dy * (x - m))`` in float64.

A module also has ``NAME`` and ``FAMILIES`` (the array families it takes).
Adding a backend is one new module here and one line in ``fastbn.dispatch``.
"""

import os


def cache_enabled():
    """``FASTBN_CACHE`` read from the environment: False for ``0``, ``false``, ``no`` or
    empty, else True (the default).  The one parser of it, for the CPU (``_jit``) and
    CUDA (``cuda_numba``) kernels; here because importing ``_jit`` installs its
    cache locator, which the CUDA backend must not depend on."""
    return os.environ.get("FASTBN_CACHE", "1") not in ("0", "false", "no", "")
