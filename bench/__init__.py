"""Benchmarks: pytest-benchmark microbenchmarks (bench_*.py) and the comparison report
(`python -m bench.compare`)."""
