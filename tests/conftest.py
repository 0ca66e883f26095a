"""Suite-wide: one torch thread per test process, and x86 CPU kernels held at AVX2.

Threads: the tiny models gain nothing from them, and pytest runs two workers (pyproject's -n 2) on the 2-core CI
machine; two threads each would wait on one another.

Kernels: torch, MKL and oneDNN pick their kernels by the CPU's instruction set, and AVX-512 kernels round in another
order than AVX2 ones. The byte-identical export references (tests/tiny/reference_loras.json) and the float64
equivalence tolerances were taken on AVX2 machines, so on an AVX-512 machine they failed in the last bits with nothing
changed. Capping every x86 machine at AVX2 (which all of them have) makes those checks mean the same on each. Set
before the first kernel runs (the three libraries read these once, at first use); a value set outside is kept."""

import os
import platform

if platform.machine().lower() in ("x86_64", "amd64"):
    for name, value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
                        ("ONEDNN_MAX_CPU_ISA", "AVX2")):
        os.environ.setdefault(name, value)

import torch  # noqa: E402  (after the kernel caps above)

torch.set_num_threads(1)
