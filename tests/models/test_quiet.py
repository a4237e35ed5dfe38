"""The libraries' noise lmforge quiets on the command line (models/quiet.py)."""

from __future__ import annotations

import logging

import datasets
import pytest
from transformers.utils import logging as hf_logging

from lmforge.models.quiet import BNB_CPU_KERNEL_LOGGER, quiet_libraries


@pytest.fixture
def restore_bars():
    yield
    datasets.enable_progress_bars()
    hf_logging.enable_progress_bar()


def test_the_bitsandbytes_kernels_hint_is_dropped_and_nothing_else(caplog, restore_bars):
    quiet_libraries()
    logger = logging.getLogger(BNB_CPU_KERNEL_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BNB_CPU_KERNEL_LOGGER):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
            "already `pip install kernels` and the kernels >= 0.11.1",
            "No module named 'kernels'",
        )
        logger.warning("something else bitsandbytes says")
    assert [r.getMessage() for r in caplog.records] == ["something else bitsandbytes says"]
    quiet_libraries()  # twice is once
    assert logger.filters.count(logger.filters[0]) == 1


def test_library_bars_are_off_unless_asked_for(monkeypatch, restore_bars):
    hf_logging.enable_progress_bar()
    datasets.enable_progress_bars()
    monkeypatch.setenv("LMFORGE_LIBRARY_BARS", "1")
    quiet_libraries()
    assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
    monkeypatch.delenv("LMFORGE_LIBRARY_BARS")
    quiet_libraries()
    assert not hf_logging.is_progress_bar_enabled() and not datasets.is_progress_bar_enabled()
