"""Benchmark tooling for fastbn: not part of the library's API.

* :mod:`fastbn.tools.harness` -- the timing harness every benchmark shares:
  interleaved repeats (:class:`~fastbn.tools.harness.Runner`,
  :func:`~fastbn.tools.harness.measure`), the run's environment (threads,
  PyTorch), and the 2-thread copy kernels that measure the bandwidth.
* :mod:`fastbn.tools.bench` -- ``python -m fastbn bench``: fastbn against its
  peers and the bandwidth roofline on a fixed list of cases.
* :mod:`fastbn.tools.sweep` -- ``python -m fastbn bench --sweep``: every
  operation x layout x size against PyTorch, a speed-up table and plot.
* :mod:`fastbn.tools.bench_gpu` / :mod:`fastbn.tools.bench_dask` -- the CUDA
  and Dask benchmarks (``bench --gpu`` / ``bench --dask``).

The tools use fastbn's public functions only, so what they time is what a user
calls.
"""
