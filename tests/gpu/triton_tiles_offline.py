"""Compile every autotune tile of core/triton_attention.py for an H100 / H200 (sm_90) on a machine without a GPU and
print what ptxas reports: register spill stores and shared memory per tile. How TILES was chosen; rerun after a
kernel change:

    python tests/gpu/triton_tiles_offline.py            # all three kernels, head dims 40, 64, 80, 160
    python tests/gpu/triton_tiles_offline.py dkdv dq    # some of them

A tile that spills still runs (the autotuner times it); one that needs more than the card's 227 KiB of shared
memory per block would not. Takes a few seconds per tile.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from stepdistill.core import triton_attention as ta

KERNELS = {"fwd": ta._fwd_kernel, "dkdv": ta._bwd_dkdv_kernel, "dq": ta._bwd_dq_kernel}
HEAD_DIMS = {64: (40, 64), 128: (80,), 256: (160,)}  # padded head dim -> the SD head dims that use it
POINTERS = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}


def signature(kernel, constexprs: dict) -> dict:
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in POINTERS:
            types[name] = "*bf16"
        elif name in ("LSE", "DELTA"):
            types[name] = "*fp32"
        elif name.startswith("scale"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def spills(ptx: str) -> str:
    """ptxas's spill-store count for the PTX, with the flags triton itself passes."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", f.name, "-o",
                          os.devnull], check=True, capture_output=True, text=True).stderr
    os.unlink(f.name)
    found = re.search(r"(\d+) bytes spill stores", out)
    return found.group(1) if found else "?"


def main(names) -> None:
    target = GPUTarget("cuda", 90, 32)
    for name in names:
        kernel = KERNELS[name]
        for block_d, tiles in ta.TILES[name].items():
            for head_dim in HEAD_DIMS[block_d]:
                for m, n, warps, stages in tiles:
                    const = {"HEAD_DIM": head_dim, "BLOCK_D": ta._block_d(head_dim), "BLOCK_M": m, "BLOCK_N": n,
                             "DOT_PRECISION": None}
                    compiled = triton.compile(ASTSource(kernel, signature(kernel, const), const), target=target,
                                              options={"num_warps": warps, "num_stages": stages})
                    print(f"{name} D={head_dim} {m}x{n} warps={warps} stages={stages}: spill stores "
                          f"{spills(compiled.asm['ptx'])} B, shared memory {compiled.metadata.shared} B", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(KERNELS))
