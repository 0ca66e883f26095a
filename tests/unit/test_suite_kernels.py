"""The suite's x86 kernel cap (tests/conftest.py): the export references and float64 tolerances hold on AVX2 kernels."""

import os
import platform

import pytest
import torch


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the cap is for x86 machines")
def test_x86_kernels_run_at_avx2_in_the_suite():
    if os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        pytest.skip("ATEN_CPU_CAPABILITY was set outside the suite")
    assert os.environ["MKL_ENABLE_INSTRUCTIONS"] == "AVX2" and os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
