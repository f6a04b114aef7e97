# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The fast lane's argument checks, compiled (``fastbn.fastlane`` calls these
when the extension is built, else its Python twins, which decide the same).

For a few-KB input, checking a call in Python costs more than the kernel: a
NumPy attribute or comparison is 0.1-0.2 us, and a call has ~40 of them (~6 us
on this project's 2-core VM, against ~3 us for the kernel).  Here they read
the array structs directly.  Each ``*_args`` function takes the public
function's arguments and returns None (the call is not one the fused kernel
takes as it is: the caller runs the general path, which gives the errors), or
the kernel's arguments: ``(outer, C, inner)`` views, new outputs.  Nothing is
written and nothing raises for bad input.

What a call must be (``fastbn/fastlane.py``'s docstring says it for both
implementations): ``x`` (and ``dy``, ``out``) exactly ``numpy.ndarray``,
native float16/32/64, 0 < size <= ``limit``, C-contiguous or C-contiguous
with the channel axis moved last (one layout for all of them, ``x``'s);
``channel_axis`` an ``int`` in range; ``eps``/``momentum`` ``float`` in range;
per-channel vectors None or C-contiguous ``(C,)`` ndarrays (of the per-channel
dtype where named); nothing written shares memory with another argument.
Every array here is one dense block, so two arrays share memory exactly when
their byte ranges meet.
"""

cimport numpy as cnp
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    # declared here: numpy's .pxd leaves them out or types them so that the
    # reference PyArray_NewFromDescr steals is not taken (we take it by hand)
    object PyArray_NewFromDescr(PyTypeObject* subtype, cnp.PyArray_Descr* descr, int nd,
                                cnp.npy_intp* dims, cnp.npy_intp* strides, void* data,
                                int flags, PyObject* obj)
    object PyArray_NewLikeArray(cnp.ndarray prototype, cnp.NPY_ORDER order,
                                cnp.PyArray_Descr* descr, int subok)
    PyTypeObject PyArray_Type


cdef int _data_type(object a):
    """``a``'s NumPy type number if it is exactly an ndarray of native float16/32/64,
    else -1."""
    if not cnp.PyArray_CheckExact(a):
        return -1
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int t = cnp.PyArray_TYPE(arr)
    if (t == cnp.NPY_FLOAT16 or t == cnp.NPY_FLOAT or t == cnp.NPY_DOUBLE) and \
            cnp.PyArray_ISNOTSWAPPED(arr):
        return t
    return -1


cdef inline int _param_type(int t):
    """The per-channel type of data of type ``t`` (float32 for float16)."""
    return cnp.NPY_FLOAT if t == cnp.NPY_FLOAT16 else t


cdef bint _channels_last(cnp.ndarray a, int ax):
    """``a``'s memory is C-contiguous with axis ``ax`` moved last (strides of
    length-1 axes do not count, as in NumPy's own contiguity flags)."""
    cdef int nd = cnp.PyArray_NDIM(a), i
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp* strides = cnp.PyArray_STRIDES(a)
    cdef cnp.npy_intp expect = cnp.PyArray_ITEMSIZE(a)
    if dims[ax] != 1 and strides[ax] != expect:
        return False
    expect *= dims[ax]
    for i in range(nd - 1, -1, -1):
        if i == ax:
            continue
        if dims[i] != 1 and strides[i] != expect:
            return False
        expect *= dims[i]
    return True


cdef class _Plan:
    """The canonical (outer, C, inner) view of a call's data: its shape, and
    whether the memory is channels-last (else C-contiguous)."""
    cdef cnp.npy_intp s3[3]
    cdef bint cl
    cdef int ax

    cdef bint same_layout(self, cnp.ndarray a):
        """``a`` (of ``x``'s shape) lies in memory as ``x`` does."""
        return _channels_last(a, self.ax) if self.cl else cnp.PyArray_IS_C_CONTIGUOUS(a)

    cdef object view3(self, cnp.ndarray a):
        """``a``'s (outer, C, inner) view (``a`` in ``x``'s layout)."""
        cdef cnp.npy_intp strides[3]
        cdef cnp.npy_intp it = cnp.PyArray_ITEMSIZE(a)
        strides[2] = it
        strides[1] = it if self.cl else it * self.s3[2]
        strides[0] = strides[1] * self.s3[1]
        cdef cnp.PyArray_Descr* descr = cnp.PyArray_DESCR(a)
        Py_INCREF(<object>descr)   # PyArray_NewFromDescr steals it
        cdef cnp.ndarray v = PyArray_NewFromDescr(
            &PyArray_Type, descr, 3, self.s3, strides, cnp.PyArray_DATA(a),
            cnp.NPY_ARRAY_WRITEABLE if cnp.PyArray_ISWRITEABLE(a) else 0, NULL)
        cnp.set_array_base(v, a)
        return v


cdef _Plan _plan(object x, object channel_axis, cnp.npy_intp limit):
    """The plan of a call on ``x`` (already checked by _data_type), or None."""
    cdef cnp.ndarray arr = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(arr)
    if type(channel_axis) is not int or not -nd <= channel_axis < nd:
        return None
    cdef cnp.npy_intp size = cnp.PyArray_SIZE(arr)
    if not 0 < size <= limit:
        return None
    cdef int ax = <int>channel_axis
    if ax < 0:
        ax += nd
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(arr)
    cdef _Plan p = _Plan.__new__(_Plan)
    p.ax = ax
    cdef int i
    if dims[ax] == 1 and cnp.PyArray_IS_C_CONTIGUOUS(arr):   # one channel: as fastbn.layout plans it
        p.cl = False
        p.s3[0] = 1
        p.s3[2] = size
    elif cnp.PyArray_IS_C_CONTIGUOUS(arr):
        p.cl = False
        p.s3[0] = 1
        p.s3[2] = 1
        for i in range(ax):
            p.s3[0] *= dims[i]
        for i in range(ax + 1, nd):
            p.s3[2] *= dims[i]
    elif _channels_last(arr, ax):
        p.cl = True
        p.s3[0] = size // dims[ax]
        p.s3[2] = 1
    else:
        return None
    p.s3[1] = dims[ax]
    return p


cdef bint _vector(object v, cnp.npy_intp C, int t):
    """``v`` is None or a C-contiguous (C,) ndarray of type ``t`` (of native
    float16/32/64 when ``t`` is -1)."""
    if v is None:
        return True
    cdef int vt = _data_type(v)
    if vt < 0 or (t >= 0 and vt != t):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>v
    return (cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_DIMS(a)[0] == C
            and cnp.PyArray_IS_C_CONTIGUOUS(a))


cdef object _output(object out, cnp.ndarray x, object dy, _Plan p):
    """The array the kernel writes: new like ``x`` (``out`` None), else ``out`` if
    it is ``x``, ``dy`` or an ndarray of ``x``'s type and shape in ``x``'s layout,
    and writeable; else None."""
    if out is None:
        return PyArray_NewLikeArray(x, cnp.NPY_KEEPORDER, NULL, 0)
    if out is not x and out is not dy:
        if _data_type(out) != cnp.PyArray_TYPE(x):
            return None
        if not cnp.PyArray_SAMESHAPE(<cnp.ndarray>out, x) or not p.same_layout(<cnp.ndarray>out):
            return None
    return out if cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out) else None


cdef bint _meet(object a, object b):
    """Two arrays (or None) share memory: the same object, or byte ranges that
    meet (every array here is one dense block)."""
    if a is None or b is None:
        return False
    if a is b:
        return True
    cdef cnp.ndarray u = <cnp.ndarray>a, v = <cnp.ndarray>b
    cdef char* lo1 = <char*>cnp.PyArray_DATA(u)
    cdef char* lo2 = <char*>cnp.PyArray_DATA(v)
    return lo1 < lo2 + cnp.PyArray_NBYTES(v) and lo2 < lo1 + cnp.PyArray_NBYTES(u)


cdef bint _apart(tuple written, tuple others):
    """No array of ``written`` (None entries skipped) shares memory with another
    of ``written`` or of ``others``."""
    cdef Py_ssize_t i, j, n = len(written)
    for i in range(n):
        w = written[i]
        if w is None:
            continue
        for j in range(i + 1, n):
            if _meet(w, written[j]):
                return False
        for o in others:
            if _meet(w, o):
                return False
    return True


def train_args(x, scale, offset, channel_axis, eps, running_mean, running_var, momentum, out,
               cnp.npy_intp limit, bint f64_stats):
    """``(x3, y, y3, mean, invstd)`` for ``train_small3``, or None.  ``mean`` and
    ``invstd`` are new (C,) vectors, float64 with ``f64_stats``, else of the
    per-channel dtype."""
    cdef int t = _data_type(x)
    if t < 0:
        return None
    cdef _Plan p = _plan(x, channel_axis, limit)
    if (p is None or p.s3[0] * p.s3[2] < 2 or type(eps) is not float or not eps >= 0.0
            or type(momentum) is not float or not 0.0 <= momentum <= 1.0):
        return None
    cdef int pt = _param_type(t)
    cdef cnp.npy_intp C = p.s3[1]
    if not (_vector(scale, C, pt) and _vector(offset, C, pt) and _vector(running_mean, C, pt)
            and _vector(running_var, C, pt)):
        return None
    for r in (running_mean, running_var):
        if r is not None and not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>r):
            return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    y = _output(out, xa, None, p)
    if y is None:
        return None
    if out is not None:
        if not _apart((running_mean, running_var, y),
                      (scale, offset) if y is x else (x, scale, offset)):
            return None
    elif not _apart((running_mean, running_var), (x, scale, offset)):
        return None
    cdef int st = cnp.NPY_DOUBLE if f64_stats else pt
    return (p.view3(xa), y, p.view3(<cnp.ndarray>y), cnp.PyArray_EMPTY(1, &C, st, 0),
            cnp.PyArray_EMPTY(1, &C, st, 0))


def infer_args(x, scale, offset, mean, var, channel_axis, eps, out, cnp.npy_intp limit):
    """``(x3, y, y3)`` for ``infer_small3``, or None."""
    cdef int t = _data_type(x)
    if t < 0 or mean is None or var is None or type(eps) is not float or not eps >= 0.0:
        return None
    cdef _Plan p = _plan(x, channel_axis, limit)
    if p is None:
        return None
    cdef cnp.npy_intp C = p.s3[1]
    if not (_vector(scale, C, -1) and _vector(offset, C, -1) and _vector(mean, C, -1)
            and _vector(var, C, -1)):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    y = _output(out, xa, None, p)
    if y is None:
        return None
    if out is not None and not _apart(
            (y,), (scale, offset, mean, var) if y is x else (x, scale, offset, mean, var)):
        return None
    return p.view3(xa), y, p.view3(<cnp.ndarray>y)


def backward_args(dy, x, scale, mean, invstd, channel_axis, out, cnp.npy_intp limit,
                  bint same_dtype=False):
    """``(dy3, x3, dx, dx3, dscale, doffset)`` for ``backward_small3``, or None;
    ``dscale``/``doffset`` are new (C,) vectors of the per-channel dtype.  With
    ``same_dtype`` the vectors must be of the per-channel dtype too."""
    cdef int t = _data_type(x)
    if t < 0 or mean is None or invstd is None or _data_type(dy) != t:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x, dya = <cnp.ndarray>dy
    if not cnp.PyArray_SAMESHAPE(dya, xa):
        return None
    cdef _Plan p = _plan(x, channel_axis, limit)
    if p is None or not p.same_layout(dya):
        return None
    cdef cnp.npy_intp C = p.s3[1]
    cdef int pt = _param_type(t)
    cdef int vt = pt if same_dtype else -1
    if not (_vector(scale, C, vt) and _vector(mean, C, vt) and _vector(invstd, C, vt)):
        return None
    dx = _output(out, xa, dy, p)
    if dx is None:
        return None
    if out is not None:
        others = tuple([a for a in (x, dy) if a is not dx]) + (scale, mean, invstd)
        if not _apart((dx,), others):
            return None
    return (p.view3(dya), p.view3(xa), dx, p.view3(<cnp.ndarray>dx),
            cnp.PyArray_EMPTY(1, &C, pt, 0), cnp.PyArray_EMPTY(1, &C, pt, 0))


cdef int _param_axis(object p, cnp.ndarray x, int pt):
    """The one axis of ``x`` along which ``p`` (a C-contiguous ndarray of type
    ``pt``) holds a value per channel: ``p`` has ``x``'s ndim and is 1 on every
    axis but that one, where it is ``x``'s length (> 1); or ``p`` is 1-D, as
    long as ``x``'s last axis (NumPy's broadcasting).  -1 for anything else."""
    if _data_type(p) != pt:
        return -1
    cdef cnp.ndarray a = <cnp.ndarray>p
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        return -1
    cdef int nd = cnp.PyArray_NDIM(x), pnd = cnp.PyArray_NDIM(a), i, ax = -1
    cdef cnp.npy_intp* xd = cnp.PyArray_DIMS(x)
    cdef cnp.npy_intp* pd = cnp.PyArray_DIMS(a)
    if pnd == 1 and nd >= 1:
        return nd - 1 if pd[0] == xd[nd - 1] else -1
    if pnd != nd:
        return -1
    for i in range(nd):
        if pd[i] != 1:
            if ax >= 0 or pd[i] != xd[i]:
                return -1
            ax = i
    return ax


cdef object _flat(cnp.ndarray a):
    """A C-contiguous ``a``'s 1-D view."""
    cdef cnp.npy_intp n = cnp.PyArray_SIZE(a)
    cdef cnp.npy_intp stride = cnp.PyArray_ITEMSIZE(a)
    cdef cnp.PyArray_Descr* descr = cnp.PyArray_DESCR(a)
    Py_INCREF(<object>descr)
    cdef cnp.ndarray v = PyArray_NewFromDescr(
        &PyArray_Type, descr, 1, &n, &stride, cnp.PyArray_DATA(a),
        cnp.NPY_ARRAY_WRITEABLE if cnp.PyArray_ISWRITEABLE(a) else 0, NULL)
    cnp.set_array_base(v, a)
    return v


def channel_params(x, mean, variance, offset, scale):
    """``batch_normalization``'s parameters as per-channel vectors: ``(channel_axis,
    mean, variance, offset, scale)`` with 1-D views, when ``x`` is an ndarray of
    native float16/32/64, mean and variance are given, and every parameter given is
    per-channel along the same axis (see _param_axis) and of ``x``'s per-channel
    dtype (what ``moments`` returns; other dtypes take the general path, which
    converts them once, rather than a compiled kernel per mix); else None."""
    cdef int t = _data_type(x)
    if t < 0 or mean is None or variance is None:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int ax = -1, a, pt = _param_type(t)
    for p in (mean, variance, offset, scale):
        if p is None:
            continue
        a = _param_axis(p, xa, pt)
        if a < 0 or (ax >= 0 and a != ax):
            return None
        ax = a
    return (ax,) + tuple([None if p is None else _flat(<cnp.ndarray>p)
                          for p in (mean, variance, offset, scale)])


def view3_args(x, channel_axis, cnp.npy_intp limit):
    """``x``'s (outer, C, inner) view, or None (``x`` not exactly an ndarray of
    native float16/32/64 with 0 < size <= ``limit`` in one of the two layouts,
    or a bad ``channel_axis``)."""
    if _data_type(x) < 0:
        return None
    cdef _Plan p = _plan(x, channel_axis, limit)
    return None if p is None else p.view3(<cnp.ndarray>x)
