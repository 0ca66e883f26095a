"""Each real image keeps its original size and crop offset (SDXL's micro-conditioning) through every reader, and
the unconditional branch of CFG takes the conditional rows' size ids."""

from __future__ import annotations

import torch
from PIL import Image

from stepdistill.core.denoiser import Cond, uncond_for
from stepdistill.data.images import read_image_folder, uncropped_sizes
from stepdistill.data.prompts import PromptData
from stepdistill.data.sources import open_images
from stepdistill.data.stream import _read_all

# (width, height) -> the size row at resolution 16 (original H, W, crop top, left): the shorter side is resized to
# 16, the crop offset counted in the resized image's pixels (diffusers' train_text_to_image_sdxl.py convention).
IMAGES = {
    "wide": ((40, 20), (20, 40, 0, 8)),  # resized to 32 x 16: left = (32 - 16) / 2
    "tall": ((30, 60), (60, 30, 8, 0)),  # resized to 16 x 32: top = 8
    "odd": ((21, 16), (16, 21, 0, 2)),  # not resized; round(2.5) = 2 (half to even), as diffusers rounds
    "square": ((16, 16), (16, 16, 0, 0)),
}


def _striped(w, h):
    """Red left tenth, blue right tenth, green between: the centre crop of a wide image is all green."""
    im = Image.new("RGB", (w, h), (0, 255, 0))
    im.paste((255, 0, 0), (0, 0, w // 4, h))
    im.paste((0, 0, 255), (w - w // 4, 0, w, h))
    return im


def _folder(tmp_path):
    for name, ((w, h), _) in IMAGES.items():
        _striped(w, h).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a {name} picture")
    return tmp_path


def test_folder_reader_records_original_size_and_crop(tmp_path):
    images, captions, sizes, _ = read_image_folder(_folder(tmp_path), 16)
    names = [c.split()[1] for c in captions]
    assert sizes.dtype == torch.long and sizes.tolist() == [list(IMAGES[n][1]) for n in names]
    assert images.shape == (4, 3, 16, 16)
    wide = images[names.index("wide")]  # the crop came from the middle: the red and blue edges are cut away
    assert float(wide[1].mean()) > 0.95 and float(wide[0].max()) < -0.9


def test_stream_sources_record_the_same_rows(tmp_path):
    source = open_images(str(_folder(tmp_path)), 16)
    records = _read_all(source, "imgs", 0.0)
    by_caption = {text.split()[1]: size for text, _, size in records}
    assert by_caption == {n: row for n, (_, row) in IMAGES.items()}
    # The in-memory and streamed readers decode the same pixels.
    images, captions, _, _ = read_image_folder(tmp_path, 16)
    for text, image, _ in records:
        torch.testing.assert_close(image, images[captions.index(text)])


def test_toy_images_are_uncropped_at_the_resolution():
    assert uncropped_sizes(2, 64).tolist() == [[64, 64, 0, 0]] * 2


def _cond(n, ids):
    return Cond(torch.zeros(n, 3, 4), {"text_embeds": torch.zeros(n, 2), "time_ids": torch.tensor(ids).float()})


def test_prompt_data_serves_each_records_size_row():
    rows = [list(r) for _, r in IMAGES.values()]
    data = PromptData([f"p{i}" for i in range(4)], _cond(4, [[0] * 6] * 4), _cond(1, [[0] * 6]), batch_size=2,
                      seed=0, latents=torch.arange(4.0).reshape(4, 1, 1, 1), image_sizes=torch.tensor(rows))
    for _ in range(2):
        prompts, _, _, latents, sizes = data.next()
        assert sizes.tolist() == [rows[int(p[1:])] for p in prompts]
        assert latents.flatten().tolist() == [float(p[1:]) for p in prompts]


def test_uncond_takes_the_conditional_rows_size_ids():
    ids = [[20, 40, 0, 8, 32, 32], [60, 30, 8, 0, 32, 32]]
    uncond = uncond_for(_cond(1, [[32, 32, 0, 0, 32, 32]]), _cond(2, ids), 2)
    assert uncond.added_cond_kwargs["time_ids"].tolist() == ids
    assert len(uncond) == 2 and not uncond.added_cond_kwargs["text_embeds"].any()
    plain = Cond(torch.zeros(1, 3, 4))  # SD1.5: no added conditioning, nothing to copy
    assert len(uncond_for(plain, Cond(torch.ones(2, 3, 4)), 2)) == 2
