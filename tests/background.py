"""Slow subprocess checks started when the run starts, awaited where their tests run.

Two checks spend minutes waiting on another process: the CUDA simulator suite
(its own process: ``NUMBA_ENABLE_CUDASIM`` is read once at import) and the asv
smoke run.  Run in line they added ~4 of the suite's ~12 minutes with one
core idle.  A test module declares such work in a module-level ``BACKGROUND``
dict (``{key: function}``); ``tests/conftest.py`` submits it once collection
has finished, for modules with selected tests, and the tests call
:func:`result` (which runs the function in line if it was not started).

The jobs run one at a time on one worker thread (the thread only waits on a
child process; the other core keeps running the main suite), and a child
still running when the session ends is killed (``-x``, Ctrl-C).
"""

import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastbn-tests-background")
_jobs = {}
_children = set()
_lock = threading.Lock()


def submit(key, function):
    """Start ``function()`` on the background worker unless ``key`` was started."""
    with _lock:
        if key not in _jobs:
            _jobs[key] = _pool.submit(function)
        return _jobs[key]


def result(key, function):
    """``function()``'s return value (or exception), started now if it was not yet."""
    return submit(key, function).result()


def run(args, timeout, **kwargs):
    """``subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)``
    that :func:`stop` can kill: returns the ``CompletedProcess``."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)
    with _lock:
        _children.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(args, timeout, out, err) from None
    finally:
        with _lock:
            _children.discard(proc)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def stop():
    """Kill the children still running and drop the jobs not yet started."""
    with _lock:
        for proc in _children:
            proc.kill()
    _pool.shutdown(wait=True, cancel_futures=True)
