"""CLIP score plumbing on a tiny CLIPModel built from a config: prefix, scale per convention, batching."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from stepdistill.metrics.clip import (
    CONVENTIONS,
    CLIPScorer,
    HFCLIPEncoder,
    cosine_score,
    get_convention,
    load_clip_encoder,
)
from stepdistill.models.tokenizer import TINY_WORDS, build_word_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def encoder():
    tokenizer = build_word_tokenizer(TINY_WORDS + ["depicts"])
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, **ids),
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=16,
    )
    torch.manual_seed(0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return HFCLIPEncoder(CLIPModel(config), processor, tokenizer)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


CAPTIONS = ["a red cat on the sea", "a blue car in the city", "a small yellow bird in a tree"]


def test_cosine_score_of_parallel_embeddings_is_the_scale():
    emb = torch.randn(3, 8)
    torch.testing.assert_close(cosine_score(emb, 2 * emb, 100.0), torch.full((3,), 100.0))
    torch.testing.assert_close(cosine_score(emb, -emb, 1.0), torch.full((3,), -1.0))


def test_gigagan_convention_prefixes_the_caption_and_reports_raw_cosine(encoder):
    images = _images(3)
    scores = CLIPScorer(encoder, "gigagan").scores(images, CAPTIONS)
    prefixed = ["A photo depicts " + c for c in CAPTIONS]
    expected = cosine_score(encoder.encode_images(images), encoder.encode_texts(prefixed), 1.0)
    torch.testing.assert_close(scores, expected)
    unprefixed = cosine_score(encoder.encode_images(images), encoder.encode_texts(CAPTIONS), 1.0)
    assert not torch.allclose(scores, unprefixed)
    assert scores.abs().max() <= 1.0


def test_torchmetrics_convention_is_100_times_the_unprefixed_cosine(encoder):
    images = _images(3)
    raw = dataclasses.replace(CONVENTIONS["gigagan"], prefix="")
    scaled = CLIPScorer(encoder, "torchmetrics").scores(images, CAPTIONS)
    torch.testing.assert_close(scaled, 100 * CLIPScorer(encoder, raw).scores(images, CAPTIONS))
    torchmetrics = CONVENTIONS["torchmetrics"]
    assert torchmetrics.prefix == "" and torchmetrics.model == "openai/clip-vit-large-patch14"
    assert CONVENTIONS["gigagan"].model == "ViT-g-14" and CONVENTIONS["gigagan"].pretrained == "laion2b_s12b_b42k"


def test_torchmetrics_aggregate_clamps_the_mean_at_zero(encoder):
    assert CLIPScorer(encoder, "torchmetrics").aggregate(torch.tensor([-3.0, 1.0])) == 0.0
    assert CLIPScorer(encoder, "gigagan").aggregate(torch.tensor([-0.3, 0.1])) == pytest.approx(-0.1)


def test_scores_do_not_depend_on_batching(encoder, tmp_path):
    from stepdistill.eval.clip import score_entries

    images = _images(5, seed=1)
    entries = []
    for i, img in enumerate(images):
        img.save(tmp_path / f"{i}.png")
        entries.append({"id": str(i), "prompt": CAPTIONS[i % 3], "file": f"{i}.png"})
    scorer = CLIPScorer(encoder, "gigagan")
    one = score_entries(scorer, tmp_path, entries, batch_size=1, progress=False)
    three = score_entries(scorer, tmp_path, entries, batch_size=3, progress=False)
    torch.testing.assert_close(one, three, rtol=1e-5, atol=1e-6)
    assert one.shape == (5,)


def test_compute_clip_labels_its_convention_in_metrics_json(encoder, tmp_path):
    from stepdistill.eval.clip import compute_clip

    (tmp_path / "images").mkdir()
    lines = []
    for i, img in enumerate(_images(4, seed=2)):
        img.save(tmp_path / "images" / f"{i}.png")
        lines.append(json.dumps({"id": str(i), "prompt": CAPTIONS[i % 3], "seed": i, "file": f"images/{i}.png"}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    for conv in CONVENTIONS:
        compute_clip(tmp_path, conv, encoder=encoder, eval_res=32, device="cpu", progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["clip"]
    assert set(metrics) == {"gigagan", "torchmetrics"}
    assert metrics["gigagan"]["prefix"] == "A photo depicts " and metrics["gigagan"]["scale"] == 1.0
    assert metrics["torchmetrics"]["scale"] == 100.0 and "x100" in metrics["torchmetrics"]["label"]
    assert metrics["gigagan"]["n"] == 4 and metrics["gigagan"]["eval_res"] == 32


def test_unknown_convention_lists_the_known_ones():
    with pytest.raises(ValueError, match="gigagan"):
        get_convention("hessel")


def test_missing_transformers_weights_say_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        load_clip_encoder("torchmetrics", weights=str(tmp_path / "no-such-clip"))


def test_missing_open_clip_says_which_extra_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(ImportError, match=r"stepdistill\[clip\]"):
        load_clip_encoder("gigagan")


def test_absent_preference_metrics_are_skipped_with_a_notice(monkeypatch, tmp_path, caplog):
    import sys

    from stepdistill.eval.preference import compute_preference, load_preference

    monkeypatch.setitem(sys.modules, "ImageReward", None)
    monkeypatch.setitem(sys.modules, "hpsv2", None)
    with caplog.at_level("WARNING"):
        assert load_preference("imagereward") is None
        assert load_preference("aesthetic", weights=tmp_path / "missing.pth") is None
    assert any(r.getMessage().startswith("skipping imagereward:") and "pip install image-reward" in r.getMessage()
               for r in caplog.records)
    (tmp_path / "manifest.jsonl").write_text("")
    assert compute_preference(tmp_path, ["imagereward", "hpsv21", "aesthetic"], device="cpu") == {}
    assert not (tmp_path / "metrics.json").exists()


def test_aesthetic_head_loads_the_reference_layout(tmp_path):
    from stepdistill.metrics.aesthetic import AestheticMLP

    head = AestheticMLP()
    keys = {k for k in head.state_dict() if k.endswith("weight")}
    assert keys == {f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)}  # the published .pth's key names
    assert head(torch.randn(3, 768)).shape == (3,)
