"""One fork guard for every CPU backend.

A thread pool does not survive ``fork()``: the child inherits the pool's
bookkeeping but not its threads.  GNU OpenMP (libgomp, behind the Cython
kernels and Numba's ``omp`` threading layer) then waits forever for workers
that do not exist, and Numba's ``omp`` layer aborts ("fork() called from a
process already using GNU OpenMP").  The pool is one per process, shared by
both backends and by the caller's own ``@njit(parallel=True)`` code, so a
per-backend guard (was: each backend remembered only its own parallel calls)
missed a child forked after the *other* one ran.

So the guard looks at the process, not at fastbn: just before a fork (an
``os.register_at_fork`` hook in the parent) it records whether the process has
more than one native thread -- OpenMP and TBB workers are native threads that
``threading.active_count()`` does not see, so the count comes from
``/proc/self/task`` -- and a child forked from a multithreaded parent runs
every kernel serially, on both backends.  A child forked from a single-threaded
parent has no pool to inherit and may start its own.  OpenBLAS starts its
workers when NumPy is imported, so in practice a child of a NumPy process runs
serially -- the safe side: a hang is worse than a serial child, and forked
workers (multiprocessing) share the cores anyway.  Nothing process-wide
(environment, Numba's threading layer, thread counts) is changed.
"""

import os
import threading

_TASKS = "/proc/self/task"

#: Set in the parent by the before-fork hook: did it have more than one native thread?
_parent_threaded = False
#: True in a process forked from a multithreaded parent: run kernels serially.
_serial = False
#: True once a fastbn parallel kernel ran in this process (the fallback where
#: /proc is missing, e.g. macOS).
_parallel_ran = False


def native_threads():
    """The number of native threads of this process, or None if unknown."""
    try:
        return len(os.listdir(_TASKS))
    except OSError:
        return None


def _multithreaded():
    n = native_threads()
    if n is not None:
        return n > 1
    # No /proc: a pool this process started (ours, or Numba's for the caller's
    # code) or any Python thread counts as threads.
    numba_pool = False
    try:
        from numba.np.ufunc import parallel as _np_parallel
        numba_pool = bool(getattr(_np_parallel, "_is_initialized", False))
    except Exception:  # noqa: BLE001 - Numba absent or its internals changed
        pass
    return _parallel_ran or numba_pool or threading.active_count() > 1


def _before_fork():
    global _parent_threaded
    _parent_threaded = _serial or _multithreaded()


def _after_fork_in_child():
    global _serial
    _serial = _parent_threaded


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def serial_only():
    """True if this process must not start a parallel region (see module doc)."""
    return _serial


def note_parallel():
    """Record that a parallel kernel is about to run (for the no-/proc fallback)."""
    global _parallel_ran
    _parallel_ran = True
