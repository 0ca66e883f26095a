"""Model families on tiny offline pipelines: tokenizer, tiny builder, prompt encoding vs diffusers, loading errors."""

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTokenizer, CLIPTokenizerFast

from stepdistill.core.denoiser import Cond, Denoiser, GuidedDenoiser
from stepdistill.core.schedule import NoiseSchedule
from stepdistill.models import detect_family, load_family
from stepdistill.models.tiny import TINY_PROMPTS, build_tiny_pipeline, save_tiny_pipeline
from stepdistill.models.tokenizer import TINY_WORDS, save_word_tokenizer, word_bpe

torch.set_num_threads(1)

PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
PROMPTS = ["a red cat on the sea", "a photo of a small dog", "zebra!"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: save_tiny_pipeline(root / family, family=family, seed=0) for family in PIPELINES}


# --- tokenizer ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    # Words sharing prefixes and repeated letters stress the merge construction.
    words = TINY_WORDS + ["aa", "aaa", "abab", "ab", "banana", "ban", "nan", "ana"]
    directory = tmp_path_factory.mktemp("tokenizer")
    save_word_tokenizer(directory, words, model_max_length=16)
    return directory, words


def test_every_word_is_one_token_and_round_trips(tokenizer_dir):
    directory, words = tokenizer_dir
    tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    vocab = tokenizer.get_vocab()
    for word in words:
        assert tokenizer(word, add_special_tokens=False).input_ids == [vocab[word + "</w>"]]
    sentence = " ".join(words[:10])
    assert tokenizer.decode(tokenizer(sentence).input_ids, skip_special_tokens=True) == sentence


def test_padding_and_special_ids(tokenizer_dir):
    directory, _ = tokenizer_dir
    tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    ids = tokenizer("a red cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert tokenizer.model_max_length == 16 and len(ids) == 16
    assert ids[0] == tokenizer.bos_token_id
    assert ids[4] == tokenizer.eos_token_id and set(ids[4:]) == {tokenizer.pad_token_id}
    # As in CLIP, end-of-text is the largest id, so pooling at argmax(ids) and at the first eos agree.
    assert tokenizer.eos_token_id == max(tokenizer.get_vocab().values())
    assert tokenizer.bos_token_id != tokenizer.eos_token_id != tokenizer.unk_token_id


def test_unknown_text_does_not_crash(tokenizer_dir):
    directory, _ = tokenizer_dir
    tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    ids = tokenizer("zebra 42, quokka!").input_ids
    assert tokenizer.unk_token_id in ids
    assert tokenizer.eos_token_id not in ids[:-1]  # an unknown word must not end the text early


def test_fast_and_vocab_merges_only_loading(tokenizer_dir, tmp_path):
    directory, _ = tokenizer_dir
    fast = CLIPTokenizerFast.from_pretrained(directory, local_files_only=True)
    slow = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    assert fast("a blue bird").input_ids == slow("a blue bird").input_ids
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(directory / name, tmp_path / name)
    bare = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert bare("a blue bird zebra").input_ids == slow("a blue bird zebra").input_ids


@pytest.mark.parametrize("bad", [[], ["cat2"], ["two words"], ["don't"]])
def test_word_list_errors(bad):
    with pytest.raises(ValueError, match="empty|lowercase ASCII letters"):
        word_bpe(bad)


# --- tiny pipelines -----------------------------------------------------------------------------------------------


def test_tiny_prompts_use_only_tiny_words():
    assert {w for p in TINY_PROMPTS for w in p.split()} <= set(TINY_WORDS)


@pytest.mark.parametrize("family", PIPELINES)
def test_tiny_pipeline_is_deterministic_per_seed(family):
    a, b, c = (build_tiny_pipeline(family, seed=s) for s in (0, 0, 1))
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_arch_overrides_and_derived_keys():
    pipe = build_tiny_pipeline(
        "sdxl", sample_size=4, words=["red", "cat"],
        arch={"unet": dict(block_out_channels=(16, 32), norm_num_groups=8, addition_time_embed_dim=4),
              "text_encoder_2": dict(hidden_size=48, projection_dim=24)},
    )
    assert tuple(pipe.unet.config.block_out_channels) == (16, 32)
    assert pipe.unet.config.cross_attention_dim == 32 + 48
    assert pipe.unet.config.projection_class_embeddings_input_dim == 6 * 4 + 24
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.unet.config.sample_size == 4 and pipe.vae.config.sample_size == 8
    with pytest.raises(ValueError, match="unknown parts"):
        build_tiny_pipeline("sd15", arch={"text_encoder_2": {}})
    with pytest.raises(ValueError, match="family"):
        build_tiny_pipeline("sd4")
    with pytest.raises(ValueError, match="scheduler"):
        build_tiny_pipeline("sd15", scheduler="lms")


@pytest.mark.parametrize("family", PIPELINES)
def test_tiny_folder_loads_and_generates(tiny_dirs, family):
    pipe = PIPELINES[family].from_pretrained(tiny_dirs[family], local_files_only=True)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
    gen = dict(num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0))
    latents = pipe(PROMPTS[:2], output_type="latent", **gen).images
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()
    images = pipe(PROMPTS[:1], output_type="pil", **gen).images
    assert images[0].size == (16, 16)


# --- families -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_dirs):
    return {family: (load_family(tiny_dirs[family]), PIPELINES[family].from_pretrained(tiny_dirs[family]))
            for family in PIPELINES}


def test_detect_family_and_shapes(tiny_dirs, loaded):
    for family, pipeline_class in PIPELINES.items():
        assert detect_family(tiny_dirs[family]) == family
        model = loaded[family][0]
        assert model.name == family and model.pipeline_class is pipeline_class
        assert model.vae_scale_factor == 2 and model.resolution == 16
        assert model.latent_shape(3) == (3, 4, 8, 8) and model.latent_shape(1, 32) == (1, 4, 16, 16)
        assert model.scheduler_config["beta_start"] == 0.00085 and model.path == str(tiny_dirs[family])
        assert not any(p.requires_grad for p in model.unet.parameters())
    with pytest.raises(ValueError, match="multiple"):
        loaded["sd15"][0].latent_shape(1, 17)


def _pipeline_conditioning(pipe, prompts):
    """The pipeline's own (cond, uncond) for negative_prompt=None and guidance on, as Cond pairs."""
    out = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    if isinstance(pipe, StableDiffusionXLPipeline):
        return (Cond(out[0], {"text_embeds": out[2]}), Cond(out[1], {"text_embeds": out[3]}))
    return Cond(out[0]), Cond(out[1])


@pytest.mark.parametrize("family", PIPELINES)
def test_encode_prompts_and_empty_cond_equal_pipeline(loaded, family):
    model, pipe = loaded[family]
    cond, uncond = model.encode_prompts(PROMPTS), model.empty_cond(len(PROMPTS))
    ref_cond, ref_uncond = _pipeline_conditioning(pipe, PROMPTS)
    torch.testing.assert_close(cond.encoder_hidden_states, ref_cond.encoder_hidden_states)
    torch.testing.assert_close(uncond.encoder_hidden_states, ref_uncond.encoder_hidden_states)
    if family == "sdxl":
        torch.testing.assert_close(cond.added_cond_kwargs["text_embeds"], ref_cond.added_cond_kwargs["text_embeds"])
        assert not uncond.added_cond_kwargs["text_embeds"].any() and not uncond.encoder_hidden_states.any()
        expected_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * len(PROMPTS))
        torch.testing.assert_close(cond.added_cond_kwargs["time_ids"], expected_ids)
        torch.testing.assert_close(uncond.added_cond_kwargs["time_ids"], expected_ids)
        assert model.encode_prompts(PROMPTS[:1], resolution=32).added_cond_kwargs["time_ids"][0, 0] == 32
    else:
        assert cond.added_cond_kwargs is None and uncond.added_cond_kwargs is None


def test_sdxl_empty_cond_without_forced_zeros(loaded):
    model, pipe = loaded["sdxl"]
    model.pipeline_config["force_zeros_for_empty_prompt"] = False
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        uncond = model.empty_cond(2)
        _, ref = _pipeline_conditioning(pipe, PROMPTS[:2])
        assert uncond.encoder_hidden_states.abs().sum() > 0
        torch.testing.assert_close(uncond.encoder_hidden_states, ref.encoder_hidden_states)
        torch.testing.assert_close(uncond.added_cond_kwargs["text_embeds"], ref.added_cond_kwargs["text_embeds"])
    finally:
        model.pipeline_config["force_zeros_for_empty_prompt"] = True
        pipe.register_to_config(force_zeros_for_empty_prompt=True)


@pytest.mark.parametrize("family", PIPELINES)
def test_cond_reproduces_pipeline_sampling(loaded, family):
    """The core CFG teacher on our Cond, stepped by DDIM, gives the pipeline's latents (time ids, uncond included)."""
    model, pipe = loaded[family]
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    x = torch.randn(model.latent_shape(2), generator=torch.Generator().manual_seed(1))
    w, steps = 3.0, 3
    expected = pipe(PROMPTS[:2], num_inference_steps=steps, guidance_scale=w, latents=x.clone(),
                    output_type="latent").images

    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(steps)
    denoiser = Denoiser(model.unet, NoiseSchedule.from_scheduler_config(model.scheduler_config))
    teacher = GuidedDenoiser(denoiser, model.empty_cond(1), guidance_scale=w)
    cond = model.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(teacher(x, t, cond).eps.float(), t, x).prev_sample
    torch.testing.assert_close(x, expected)


@pytest.mark.parametrize("family", PIPELINES)
def test_decode_matches_pipeline_and_encode_inverts_scaling(loaded, family):
    model, pipe = loaded[family]
    latents = torch.randn(model.latent_shape(2), generator=torch.Generator().manual_seed(2))
    images = model.decode(latents)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        ref = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(images, ref.clamp(-1, 1))

    encoded = model.encode_images(images, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = pipe.vae.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(encoded, raw * pipe.vae.config.scaling_factor)
    assert encoded.shape == model.latent_shape(2)


def test_family_pipeline_shares_modules(loaded):
    model, _ = loaded["sdxl"]
    pipe = model.pipeline()
    assert pipe.unet is model.unet and pipe.text_encoder_2 is model.text_encoders[1]
    assert type(pipe.scheduler).__name__ == model.scheduler_config["_class_name"]


def test_dtypes(tiny_dirs):
    sdxl = load_family(tiny_dirs["sdxl"], dtype=torch.bfloat16)
    assert sdxl.unet.dtype == torch.bfloat16 and sdxl.vae.dtype == torch.float32
    assert sdxl.encode_prompts(["a cat"]).encoder_hidden_states.dtype == torch.bfloat16
    sd15 = load_family(tiny_dirs["sd15"], dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert sd15.text_encoders[0].dtype == torch.bfloat16 and sd15.vae.dtype == torch.float32


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "nothing"
    for call in (detect_family, load_family):
        with pytest.raises(FileNotFoundError, match=r"no model at .*nothing: pass model.path="):
            call(missing)


def test_not_a_diffusers_folder_or_file(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json.*StableDiffusionPipeline.*StableDiffusionXLPipeline"):
        detect_family(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="from_single_file"):
        detect_family(weights)


def test_unsupported_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanDiTPipeline"}))
    with pytest.raises(ValueError, match="HunyuanDiTPipeline.*Supported pipelines: .*StableDiffusionPipeline"):
        load_family(tmp_path)


def test_family_mismatch(tiny_dirs):
    with pytest.raises(ValueError, match=r"model.family='sdxl' but .* holds a sd15 model"):
        load_family(tiny_dirs["sd15"], family="sdxl")
    with pytest.raises(ValueError, match="not supported"):
        load_family(tiny_dirs["sd15"], family="sd4")


def test_incomplete_folder_names_the_part(tiny_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["sd15"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(OSError, match="'vae' part"):
        load_family(broken)


def test_hub_id_offline_failure_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so "org/name" is not a local folder by accident
    with pytest.raises(OSError, match=r"no model at stepdistill-test/absent.*local Hugging Face cache.*download"):
        load_family("stepdistill-test/absent")


@pytest.mark.gpu
@pytest.mark.parametrize("family", PIPELINES)
def test_bf16_on_gpu(tiny_dirs, family):
    model = load_family(tiny_dirs[family], device="cuda", dtype=torch.bfloat16)
    cond = model.encode_prompts(PROMPTS)
    denoiser = Denoiser(model.unet, NoiseSchedule.from_scheduler_config(model.scheduler_config))
    x_t = torch.randn(model.latent_shape(len(PROMPTS)), device="cuda")
    out = GuidedDenoiser(denoiser, model.empty_cond(1), guidance_scale=3.0)(x_t, 500, cond)
    images = model.decode(out.x0)
    assert images.device.type == "cuda" and torch.isfinite(images).all()
    assert model.encode_images(images).shape == x_t.shape
