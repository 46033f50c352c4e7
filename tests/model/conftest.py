"""Fixtures shared by the evaluate-report and gate tests."""

import pytest

from . import mnist_run as mnist


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory):
    """(params, split frame) of one real run on MNIST 3s and 5s; tests must not change its outputs."""
    return mnist.run(tmp_path_factory.mktemp("mnist-run"))
