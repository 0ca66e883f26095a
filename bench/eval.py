"""Throughput of the evaluation harness on CPU with tiny models: generation and feature extraction, images/s.

    python -m stepdistill.bench.eval                       # tiny teacher + synthetic 512px PNGs, 0 and 2 resize workers
    python -m stepdistill.bench.eval --workers 0 4 8 --inception PATH/inception-2015-12-05.pt

Generation uses the tiny SD1.5 teacher (16x16 images), so its number measures the harness's overhead (noise,
PNG writing, manifest) rather than a real UNet. Feature extraction runs the real preprocessing chain on
full-size images (crop + Lanczos to eval_res, clean-fid bicubic to 299) into a tiny conv net, or into the real
Inception when given; the worker sweep shows how far the CPU resizing parallelises.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..eval.fid import extract_features, load_inception
from ..eval.generate import GENERATION_INFO, generate_images, save_png, teacher_generate_fn
from ..eval.images import CropResize
from ..eval.prompts import PromptRecord


def _tiny_extractor() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 7, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).eval()


def bench_generation(out_dir: Path, n: int, batch_size: int, steps: int = 2) -> float:
    """images/s of generate_images with the tiny SD1.5 teacher."""
    from stepdistill.models.tiny import TINY_PROMPTS, build_tiny_pipeline

    pipe = build_tiny_pipeline("sd15", seed=0)
    pipe.set_progress_bar_config(disable=True)
    records = [PromptRecord(f"{i:06d}", TINY_PROMPTS[i % len(TINY_PROMPTS)], i) for i in range(n)]
    generate_images(teacher_generate_fn(pipe, steps, 3.0), records, out_dir, batch_size, rank=0, world=1,
                    progress=False)
    return json.loads((out_dir / GENERATION_INFO).read_text())["images_per_s"]


def write_synthetic_images(folder: Path, n: int, size: int) -> list[Path]:
    """Smooth random PNGs of size x (4/3 size), like generated or COCO images, for the preprocessing cost."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size * 4 // 3, size), Image.BICUBIC)
        files.append(folder / f"{i:06d}.png")
        save_png(img, files[-1])
    return files


def bench_features(files, extractor, eval_res: int, workers: int, batch_size: int, device) -> float:
    """images/s of extract_features (decode, crop + Lanczos, bicubic to 299, network, statistics)."""
    start = time.perf_counter()
    extract_features(files, extractor, CropResize(eval_res), batch_size=batch_size, num_workers=workers,
                     device=device, keep_features=True, progress=False)
    return len(files) / (time.perf_counter() - start)


def run_bench(n: int = 32, size: int = 512, eval_res: int = 256, workers=(0, 2), batch_size: int = 8,
              inception=None, device="cpu") -> dict:
    """Measure and return {"generation_images_per_s", "features_images_per_s": {workers: images/s}}."""
    extractor = load_inception(inception, device) if inception else _tiny_extractor().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {"generation_images_per_s": bench_generation(tmp / "gen", n, batch_size)}
        files = write_synthetic_images(tmp / "images", n, size)
        result["features_images_per_s"] = {
            w: bench_features(files, extractor, eval_res, w, batch_size, device) for w in workers
        }
    result.update(n=n, size=size, eval_res=eval_res, extractor="inception" if inception else "tiny conv net",
                  device=str(device), torch_threads=torch.get_num_threads())
    return result


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=32, help="images per measurement")
    p.add_argument("--size", type=int, default=512, help="height of the synthetic images (width is 4/3 of it)")
    p.add_argument("--eval-res", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to compare")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--inception", help="measure with the real Inception weights at this path")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the main process")


def _run_and_print(args) -> dict:
    torch.set_num_threads(args.threads)
    result = run_bench(args.n, args.size, args.eval_res, tuple(args.workers), args.batch_size, args.inception)
    print(f"generation (tiny SD1.5 teacher, 2 steps): {result['generation_images_per_s']:.1f} images/s")
    for w, rate in result["features_images_per_s"].items():
        print(f"features ({args.size}px -> {args.eval_res} -> 299, {result['extractor']}, {w} workers): "
              f"{rate:.1f} images/s")
    return result


def add_bench_eval_command(subparsers) -> None:
    """Register `stepdistill bench eval` (same options as `python -m stepdistill.bench.eval`)."""
    p = subparsers.add_parser("eval", help="evaluation harness throughput: generation and FID features, images/s")
    _add_arguments(p)
    p.set_defaults(func=_run_and_print)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m stepdistill.bench.eval", description=__doc__.splitlines()[0])
    _add_arguments(p)
    return _run_and_print(p.parse_args(argv))


if __name__ == "__main__":
    main()
