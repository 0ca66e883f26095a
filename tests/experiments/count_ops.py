"""Independent count of aten ops and value reads per training iteration (issue 33's CPU proxy).

Counts with its own TorchDispatchMode, not the benchmark's report: every aten op dispatched during one real
`Trainer.iteration()` after warm-up, and the ops that read a tensor's value back to the host (each a sync on a GPU).
Usage: python tests/experiments/count_ops.py dmd sdxl [--set model.dtype=bf16 --set loop.mixed_precision=bf16]
"""

import argparse
import collections
import sys
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READS = ("_local_scalar_dense", "nonzero", "item", "tolist", "numpy", "is_nonzero", "equal", "masked_select",
         "_assert_async", "unique", "repeat_interleave")


class Count(TorchDispatchMode):
    def __init__(self, where=False):
        super().__init__()
        self.ops, self.where, self.sites = collections.Counter(), where, collections.Counter()
        self.trace = ()
        self.deep = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if self.where and (name in READS or name in self.trace or "*" in self.trace):
            self.note()
        return func(*args, **(kwargs or {}))

    def note(self):
        import traceback

        frames = [f for f in traceback.extract_stack() if self.ours(f.filename) and "count_ops" not in f.filename]
        self.sites[" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in frames[::-1][:4])] += 1

    def ours(self, filename):
        """Frames worth naming: stepdistill's, and with --deep also the libraries' (diffusers, peft, torch.nn)."""
        return "stepdistill" in filename or (self.deep and any(k in filename for k in ("diffusers", "peft", "torch/nn")))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("method")
    p.add_argument("family")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=0)
    p.add_argument("--where", action="store_true", help="print where the value reads come from")
    p.add_argument("--trace", nargs="*", default=[], help="with --where: also where these ops come from ('*': every op)")
    p.add_argument("--deep", action="store_true", help="with --where: name diffusers', peft's and torch.nn's frames too")
    a = p.parse_args(argv)
    from stepdistill.bench.train import TINY_BATCH, bench_run, make_trainer, run_iteration

    cfg, model, data = bench_run(a.method, a.family, True, "cpu", TINY_BATCH, a.set)
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(cfg, model, data, out, "cpu")
        trainer.step = max(trainer.step, getattr(cfg.method, "regression_steps", 0))
        for _ in range(a.warmup):
            run_iteration(trainer)
        mode = Count(a.where)
        mode.trace = tuple(a.trace)
        mode.deep = a.deep
        # tolist() and numpy() read a CPU tensor without dispatching an aten op (on a GPU they copy to the host):
        # count them at the Python level.
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

        def counted(name):
            def read(self, *args, **kwargs):
                mode.ops[name] += 1
                if mode.where:
                    mode.note()
                return originals[name](self, *args, **kwargs)
            return read

        try:
            for name in originals:
                setattr(torch.Tensor, name, counted(name))
            with mode:
                run_iteration(trainer)
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)
        trainer.close()
    total = sum(mode.ops.values())
    reads = {k: v for k, v in mode.ops.items() if k in READS}
    print(f"{a.method} {a.family} {' '.join(a.set)}: aten ops {total}, value reads {sum(reads.values())} {reads}")
    for k, v in mode.sites.most_common():
        print(f"  read x{v}: {k}")
    for k, v in mode.ops.most_common(a.top):
        print(f"  {k:40s} {v}")


if __name__ == "__main__":
    sys.exit(main())
