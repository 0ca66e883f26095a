"""CLIP score in the two conventions papers use; every number carries its convention's label.

  gigagan       open_clip ViT-g-14 laion2b_s12b_b42k, caption prefixed "A photo depicts ", raw cosine
                (GigaGAN, DMD2; values ~0.30-0.34)
  torchmetrics  OpenAI ViT-L/14 through transformers, raw caption, 100 x cosine (torchmetrics CLIPScore;
                SDXL-Lightning / PCM tables; values ~25-33)

The score is model-agnostic here: an encoder maps images and texts to L2-normalised embeddings, the
convention adds the prefix and the scale. Loading real weights is `load_clip_encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CLIPConvention:
    name: str
    backend: str  # "open_clip" or "transformers"
    model: str  # open_clip architecture name, or a transformers hub id / folder
    pretrained: str | None  # open_clip pretrained tag
    prefix: str
    scale: float
    label: str
    description: str


CONVENTIONS = {
    "gigagan": CLIPConvention(
        "gigagan", "open_clip", "ViT-g-14", "laion2b_s12b_b42k", "A photo depicts ", 1.0,
        "CLIP ViT-g-14 (raw cos)",
        "open_clip ViT-g-14 laion2b_s12b_b42k, caption prefixed 'A photo depicts ', mean raw cosine "
        "(GigaGAN/DMD2 convention; comparable with GigaGAN 0.33, ADD/InstaFlow-style tables)",
    ),
    "torchmetrics": CLIPConvention(
        "torchmetrics", "transformers", "openai/clip-vit-large-patch14", None, "", 100.0,
        "CLIP ViT-L/14 (x100)",
        "transformers openai/clip-vit-large-patch14, raw caption, mean of 100 x cosine clamped at 0 "
        "(torchmetrics CLIPScore convention; SDXL-Lightning/PCM-style tables)",
    ),
}


def get_convention(name: str) -> CLIPConvention:
    if name not in CONVENTIONS:
        raise ValueError(f"unknown CLIP convention {name!r}: choose one of {', '.join(CONVENTIONS)}")
    return CONVENTIONS[name]


def cosine_score(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-pair CLIP score s_i = scale * cos(E_I(x_i), E_T(c_i)) (Hessel et al. 2021, eq. 1 without the clamp/w)."""
    image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
    return scale * (image_emb * text_emb).sum(-1)


def _features(out) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFCLIPEncoder:
    """A transformers CLIPModel with its image processor and tokenizer."""

    def __init__(self, model, image_processor, tokenizer, device="cpu"):
        self.model = model.eval().to(device)
        self.image_processor, self.tokenizer, self.device = image_processor, tokenizer, torch.device(device)
        self.max_length = model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        # Pass uint8 PIL images: the processor resizes (bicubic), centre-crops and rescales by 1/255 itself.
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.model.dtype)
        return _features(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _features(self.model.get_text_features(**tokens))


class OpenCLIPEncoder:
    """An open_clip model with its preprocessing transform and tokenizer (truncates to 77, keeps the EOT)."""

    def __init__(self, model, preprocess, tokenizer, device="cpu"):
        self.model = model.eval().to(device)
        self.preprocess, self.tokenizer, self.device = preprocess, tokenizer, torch.device(device)

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(img) for img in images]).to(self.device)
        return self.model.encode_image(pixels)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


class CLIPScorer:
    """Scores (image, caption) pairs under a convention: prefix the caption, embed both, scale the cosine."""

    def __init__(self, encoder, convention: CLIPConvention | str):
        self.encoder = encoder
        self.convention = get_convention(convention) if isinstance(convention, str) else convention

    def scores(self, images, captions: list[str]) -> torch.Tensor:
        """Per-pair scores [B] for a batch of PIL images and their captions."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions: give one caption per image")
        texts = [self.convention.prefix + c for c in captions]
        return cosine_score(self.encoder.encode_images(images), self.encoder.encode_texts(texts), self.convention.scale)

    def aggregate(self, per_pair: torch.Tensor) -> float:
        """The reported number: the mean (torchmetrics also clamps its mean at 0)."""
        mean = per_pair.double().mean().item()
        return max(mean, 0.0) if self.convention.name == "torchmetrics" else mean


def load_clip_encoder(convention: CLIPConvention | str, weights=None, device="cpu", dtype=torch.float32):
    """The encoder a convention needs, from a local path or hub id (`weights`), else its default; clear errors."""
    convention = get_convention(convention) if isinstance(convention, str) else convention
    if convention.backend == "transformers":
        return _load_transformers_clip(weights or convention.model, device, dtype)
    return _load_open_clip(convention, weights, device, dtype)


def _load_transformers_clip(source, device, dtype) -> HFCLIPEncoder:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(source, dtype=dtype)
        image_processor = CLIPImageProcessor.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise FileNotFoundError(
            f"CLIP weights {source!r} are not available: on a connected machine run "
            f"`huggingface-cli download {source}` (then set HF_HUB_OFFLINE=1), or pass --clip-weights DIR, a folder "
            "with config.json, the weights, preprocessor_config.json and the tokenizer files"
        ) from e
    return HFCLIPEncoder(model, image_processor, tokenizer, device)


def _load_open_clip(convention: CLIPConvention, weights, device, dtype) -> OpenCLIPEncoder:
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(
            f"the {convention.name} CLIP convention needs open_clip: pip install 'stepdistill[clip]' "
            "(or use --convention torchmetrics, which needs only transformers)"
        ) from e
    pretrained = str(weights) if weights else convention.pretrained
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(convention.model, pretrained=pretrained)
    except (OSError, RuntimeError, ValueError) as e:
        raise FileNotFoundError(
            f"open_clip {convention.model} weights {pretrained!r} are not available: on a connected machine download "
            "laion/CLIP-ViT-g-14-laion2B-s12B-b42K (open_clip_pytorch_model.bin) from the Hugging Face hub and pass "
            "--clip-weights FILE, or populate HF_HOME and set HF_HUB_OFFLINE=1"
        ) from e
    return OpenCLIPEncoder(model.to(dtype), preprocess, open_clip.get_tokenizer(convention.model), device)
