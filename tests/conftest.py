"""Shared test fixtures."""

from typing import Any

import pytest


@pytest.fixture(scope="module")
def one_blas_thread() -> Any:
    """One BLAS thread for a module: GPTQ and perplexity make many small BLAS calls, and
    on the 2 shared cores spinning BLAS threads only slow each other down."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    limits = threadpool_limits(1)
    yield
    limits.restore_original_limits()
