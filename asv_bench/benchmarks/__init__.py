"""fastbn asv benchmarks: one module per family (see asv_bench/README.md)."""
