"""pytest-benchmark setup for bench/: benchmarks are off unless asked for, and the shapes.

Off by default: a plain `python -m pytest` runs each benchmark once as a test (pytest-benchmark's
--benchmark-disable), so the suite stays fast. Any option that asks for measurements turns them on:
--benchmark-enable, --benchmark-only, --benchmark-json, --benchmark-save, --benchmark-autosave,
--benchmark-compare. (--benchmark-disable in the ini's addopts would instead make --benchmark-only
an error: pytest-benchmark refuses the pair.)

--bench-shapes: "quick" (tiny, for the test that runs the suite), "default" (small on a CPU, one
headline shape on a GPU), "large" (the headline shapes of docs/design.md section 8; GPU), or
N,C,D triples separated by ";".
"""

import pytest

_ASKS_FOR_MEASUREMENTS = ("benchmark_enable", "benchmark_only", "benchmark_json", "benchmark_save",
                          "benchmark_autosave", "benchmark_compare")


def pytest_addoption(parser):
    parser.addoption("--bench-shapes", default="default",
                     help="benchmark shapes: quick, default, large, or N,C,D triples separated by ';'")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # runs before pytest-benchmark's own pytest_configure (trylast), which reads the option
    if not any(config.getoption(name, None) for name in _ASKS_FOR_MEASUREMENTS):
        config.option.benchmark_disable = True
