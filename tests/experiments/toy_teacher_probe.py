"""Does a toy teacher read its prompt, and which label fields do its samples get wrong? (issue 35's diagnosis)

    python tests/experiments/toy_teacher_probe.py loss   sd3 [TEACHER_DIR]      # prompt use at matched noise levels
    python tests/experiments/toy_teacher_probe.py fields sd3 [TEACHER_DIR] --n 200 --cfg 4   # per-field accuracy
    python tests/experiments/toy_teacher_probe.py text   sd3 [TEACHER_DIR]      # how far the conditioning moves

loss: on 128 held-out real images (ToyWorld().sample(128, seed=777), posterior means, one fixed noise draw), the x0
error of the denoiser with the true caption, the "" caption and a shuffled caption. Flow teachers at sigma s, eps
teachers at the DDPM t whose SNR is nearest ((1 - s) / s)^2. At a fixed noise level x0 error is eps or v error times a
constant, so the ratios uncond / cond and wrong / cond compare teachers of both parameterisations.
fields: the eval's prompts (toy_prompts(n, 0)), seeds 0..n-1, 25 steps of the teacher's scheduler; the judge's accuracy
per label field, and shape accuracy split by the object's size.
"""

import argparse
import json

import numpy as np
import torch
from stepdistill.eval.generate import teacher_generate_fn
from stepdistill.eval.toy import teacher_max_sequence_length, teacher_pipeline

from stepdistill.data.toy_world import LABEL_FIELDS, ToyWorld, parse_caption, to_float, toy_prompts
from stepdistill.metrics.toy_judge import load_judge
from stepdistill.models.registry import get_family
from stepdistill.train.toy_teacher import text_lengths, tokenize

SIGMAS = (0.95, 0.85, 0.7, 0.5, 0.3)


def encoder(pipe, fam, family, path):
    tokenizers = [getattr(pipe, t) for _, t, _, _ in fam.text_parts]
    lengths = text_lengths(fam, tokenizers, teacher_max_sequence_length(family, path))

    def encode(captions):
        ids = [tokenize(t, captions, n) for t, n in zip(tokenizers, lengths)]
        return fam.toy_encode_text(pipe, ids, torch.zeros(len(captions), dtype=torch.bool))

    return encode


def x0_error(pipe, fam, x0, eps, s, hidden, added):
    """Mean squared x0 error at flow sigma s (or the eps teacher's t of the same SNR)."""
    if fam.parameterisations == ("flow",):
        x_t = (1 - s) * x0 + s * eps
        v = fam.toy_velocity(pipe.transformer, x_t, torch.full((len(x0),), s, dtype=torch.float64), hidden, added)
        return float((((v - (eps - x0)) ** 2).flatten(1).mean(1) * s ** 2).mean())
    ac = pipe.scheduler.alphas_cumprod
    t = int(torch.argmin((ac / (1 - ac) - ((1 - s) / s) ** 2).abs()))
    x_t = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
    e = pipe.unet(x_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    return float((((e - eps) ** 2).flatten(1).mean(1) * (1 - ac[t]) / ac[t]).mean())


def prompt_use(pipe, fam, encode, n=128):
    images, captions, _ = ToyWorld().sample(n, seed=777)
    gen = torch.Generator().manual_seed(5)
    wrong = [captions[i] for i in torch.randperm(n, generator=gen).tolist()]
    post = pipe.vae.encode(to_float(images)).latent_dist
    x0 = (post.mean - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor
    eps = torch.randn(x0.shape, generator=gen)
    conds = {"cond": encode(captions), "uncond": encode([""] * n), "wrong": encode(wrong)}
    out = {}
    for s in SIGMAS:
        row = {k: x0_error(pipe, fam, x0, eps, s, *c) for k, c in conds.items()}
        row.update({"uncond/cond": row["uncond"] / row["cond"], "wrong/cond": row["wrong"] / row["cond"]})
        out[f"sigma={s}"] = {k: round(v, 4) for k, v in row.items()}
    return out


def field_accuracy(pipe, fam, family, path, n, cfg):
    length = teacher_max_sequence_length(family, path)
    generate = teacher_generate_fn(pipe, 25, **fam.toy_generate_kwargs(cfg, 32),
                                   **({} if length is None else {"max_sequence_length": length}))
    prompts, judge = toy_prompts(n, 0), load_judge()
    pred = np.concatenate([judge.predict(np.stack([np.array(im) for im in generate(prompts[i:i + 50],
                                                                                   list(range(i, min(n, i + 50))))]))
                           for i in range(0, n, 50)])
    target = np.stack([parse_caption(p) for p in prompts])
    out = {f: round(float((pred[target[:, j] >= 0, j] == target[target[:, j] >= 0, j]).mean()), 3)
           for j, f in enumerate(LABEL_FIELDS)}
    aligned, single = np.all((pred == target) | (target < 0), 1), target[:, 0] < 5
    out.update(aligned=float(aligned.mean()), aligned_single=round(float(aligned[single].mean()), 3),
               aligned_pair=round(float(aligned[~single].mean()), 3))
    for slot, (shape, size) in enumerate(((1, 3), (4, 6)), start=1):
        for value, name in enumerate(("small", "large")):
            m = target[:, size] == value
            out[f"shape{slot}_{name}"] = round(float((pred[m, shape] == target[m, shape]).mean()), 3)
    return {"family": family, "cfg": cfg, "n": n, **out}


def conditioning_change(encode):
    base = "a small red circle above a large blue square"
    variants = {"colour1": "a small green circle above a large blue square",
                "swap": "a small blue circle above a large red square",
                "relation": "a small red circle to the left of a large blue square",
                "size2": "a small red circle above a small blue square",
                "single": "a small red circle on the left", "empty": ""}
    hidden, added = encode([base])
    out = {}
    for name, prompt in variants.items():
        h, a = encode([prompt])
        row = {"hidden": round(float((h - hidden).norm() / hidden.norm()), 3)}
        for key, value in (a or {}).items():
            row[key] = round(float((value - added[key]).norm() / added[key].norm()), 3)
        out[name] = row
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("probe", choices=("loss", "fields", "text"))
    parser.add_argument("family")
    parser.add_argument("teacher_dir", nargs="?", default=None)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--cfg", type=float, default=4.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe, fam = teacher_pipeline(args.family, path=args.teacher_dir), get_family(args.family)
    encode = encoder(pipe, fam, args.family, args.teacher_dir)
    with torch.no_grad():
        if args.probe == "loss":
            result = prompt_use(pipe, fam, encode)
        elif args.probe == "fields":
            result = field_accuracy(pipe, fam, args.family, args.teacher_dir, args.n, args.cfg)
        else:
            result = conditioning_change(encode)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
