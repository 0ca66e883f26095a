"""Suite-wide: one torch thread per test process. The tiny models gain nothing from threads, and pytest runs two
workers (pyproject's -n 2) on the 2-core CI machine; two threads each would wait on one another."""

import torch

torch.set_num_threads(1)
