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


@pytest.fixture(scope="module")
def float_model() -> Any:
    """The default model with float linears on the numpy Transformer (the native decoder's
    oracle), ctx 256; one per test module that asks for it."""
    from luthier.engine import QuantConfig, load_model

    return load_model(None, QuantConfig(bits=16, head_bits=16), n_threads=2, ctx=256, native=False)


@pytest.fixture(scope="module")
def server() -> Any:
    """A BackgroundServer of the default model on a loopback port (tests/server_helpers.py);
    one per test module that asks for it (test_chat_page.py has its own)."""
    from server_helpers import start_server

    with start_server() as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> Any:
    """The `openai` client on `server`."""
    from server_helpers import make_client

    return make_client(server)
