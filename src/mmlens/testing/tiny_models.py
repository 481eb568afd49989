"""Tiny random models of every supported architecture, built from configs and saved with `save_pretrained`.

Tests and benchmarks load these folders back through the real
`from_pretrained` path, so the code under test is exactly what runs on a full-size checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from .tokenizer import word_tokenizer

IMAGE = 32  # pixels per side of the tiny models' input images
PATCH = 8  # vision patch size: (32 / 8) ** 2 = 16 patches
D = 64  # width of every tiny tower

BUILDERS: dict[str, Callable[[Path], None]] = {}


def _builder(name: str):
    def register(fn: Callable[[Path], None]):
        BUILDERS[name] = fn
        return fn

    return register


def _vision(**kw) -> dict:
    cfg = dict(
        hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE, patch_size=PATCH,
    )
    cfg.update(kw)
    return cfg


def _text(tok, **kw) -> dict:
    cfg = dict(
        vocab_size=len(tok), hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    cfg.update(kw)
    return cfg


def _clip_image_processor(size: int = IMAGE):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@_builder("clip")
def build_clip(folder: Path) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tok = word_tokenizer()
    cfg = CLIPConfig(text_config=_text(tok), vision_config=_vision(), projection_dim=32)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPProcessor(image_processor=_clip_image_processor(), tokenizer=tok).save_pretrained(folder)


@_builder("siglip")
def build_siglip(folder: Path) -> None:
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = word_tokenizer(model_max_length=16)
    text = _text(tok, max_position_embeddings=16)
    cfg = SiglipConfig(text_config=text, vision_config=_vision())
    SiglipModel(cfg).save_pretrained(folder)
    ip = SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    SiglipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)


@_builder("llava")
def build_llava(folder: Path, strategy: str = "default") -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = word_tokenizer()
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**_vision()),
        text_config=LlamaConfig(**_text(tok, num_key_value_heads=2, max_position_embeddings=128)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    LlavaProcessor(
        image_processor=_clip_image_processor(), tokenizer=tok, patch_size=PATCH,
        vision_feature_select_strategy=strategy, image_token="<image>", num_additional_image_tokens=1,
    ).save_pretrained(folder)


@_builder("llava_full")
def build_llava_full(folder: Path) -> None:
    build_llava(folder, strategy="full")


@_builder("qwen2_vl")
def build_qwen2_vl(folder: Path) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = word_tokenizer()
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2VLConfig(
        text_config=_text(
            tok, num_key_value_heads=2, max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        ),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=D, num_heads=4, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(folder)
    ip = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64,
    )
    # Qwen2VLProcessor cannot be built without torchvision in transformers 5 (its video processor needs it):
    # save the image processor and tokenizer; `sample_inputs` expands the image tokens as the processor would.
    ip.save_pretrained(folder)
    tok.save_pretrained(folder)


@_builder("paligemma")
def build_paligemma(folder: Path) -> None:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = word_tokenizer()
    cfg = PaliGemmaConfig(
        vision_config=_vision(projection_dim=D),
        text_config=_text(tok, model_type="gemma", num_key_value_heads=1, head_dim=16),
        image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=D, hidden_size=D,
    )
    PaliGemmaForConditionalGeneration(cfg).save_pretrained(folder)
    ip = SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    ip.image_seq_length = (IMAGE // PATCH) ** 2
    PaliGemmaProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)


@_builder("blip2")
def build_blip2(folder: Path) -> None:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    tok = word_tokenizer()
    cfg = Blip2Config(
        vision_config=_vision(),
        qformer_config=dict(vocab_size=len(tok), hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=2 * D, encoder_hidden_size=D),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=D, ffn_dim=2 * D, num_hidden_layers=2,
                         num_attention_heads=4, word_embed_proj_dim=D, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    Blip2ForConditionalGeneration(cfg).save_pretrained(folder)
    Blip2Processor(image_processor=_clip_image_processor(), tokenizer=tok, num_query_tokens=4).save_pretrained(folder)


def _sd_text_encoder(tok):
    from transformers import CLIPTextConfig, CLIPTextModel

    tok.model_max_length = 16
    return CLIPTextModel(CLIPTextConfig(**_text(tok, hidden_size=32, intermediate_size=64, max_position_embeddings=16)))


def _tiny_vae(**kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**kw,
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=8, sample_size=IMAGE, layers_per_block=1,
    )


@_builder("sd")
def build_sd(folder: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok = word_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=IMAGE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=_sd_text_encoder(tok), tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)


@_builder("pixart")
def build_pixart(folder: Path) -> None:
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tok = word_tokenizer(model_max_length=16)
    te = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 decoder_start_token_id=tok.pad_token_id))
    dit = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=IMAGE // 2, patch_size=2, cross_attention_dim=32, caption_channels=32, norm_num_groups=8,
    )
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=te, vae=_tiny_vae(), transformer=dit,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder)


@_builder("sd3")
def build_sd3(folder: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def clip_te(tok):
        tok.model_max_length = 16
        cfg = CLIPTextConfig(**_text(tok, hidden_size=32, intermediate_size=64, max_position_embeddings=16),
                             projection_dim=32)
        return CLIPTextModelWithProjection(cfg)

    tok1, tok2 = word_tokenizer(), word_tokenizer()
    dit = SD3Transformer2DModel(
        sample_size=IMAGE // 2, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=32,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=dit, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(shift_factor=0.0),
        text_encoder=clip_te(tok1), tokenizer=tok1, text_encoder_2=clip_te(tok2), tokenizer_2=tok2,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(folder)


def build(name: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny `name` model with random weights from `seed` and save it (plus processor) to `folder`."""
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(BUILDERS)}")
    folder = Path(folder)
    torch.manual_seed(seed)
    BUILDERS[name](folder)
    return folder


def sample_image(seed: int = 0, size: int = IMAGE):
    """A random RGB PIL image."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


def sample_inputs(name: str, lens, batch: int = 1, seed: int = 0) -> dict:
    """Processor-made inputs for a tiny model (what a user passes to `run_with_cache`)."""
    images = [sample_image(seed + k) for k in range(batch)]
    p = lens.processor
    if name in ("clip", "siglip"):
        texts = ["a photo of a red square", "a blue circle"][: max(batch, 1)] * (1 if batch <= 2 else batch)
        pad = "max_length" if name == "siglip" else True
        return dict(p(text=texts, images=images, return_tensors="pt", padding=pad))
    if name in ("llava", "llava_full"):
        prompts = ["<image> what colour is the square ?", "<image> is there a red circle on the left ?"]
        return dict(p(text=[prompts[k % 2] for k in range(batch)], images=images, return_tensors="pt", padding=True))
    if name == "paligemma":
        return dict(p(text=["what colour"] * batch, images=images, return_tensors="pt"))
    if name == "blip2":
        return dict(p(text=["what colour is it"] * batch, images=images, return_tensors="pt"))
    if name == "qwen2_vl":
        texts = ["what colour is the square ?", "is there a red circle on the left ?"]
        return qwen2_vl_inputs(lens, images, [texts[k % 2] for k in range(batch)])
    raise ValueError(f"no sample inputs for {name!r}")


def qwen2_vl_inputs(lens, images, texts) -> dict:
    """What Qwen2VLProcessor returns: image tokens expanded to (h/2)*(w/2) per image, and mm_token_type_ids."""
    from transformers import AutoImageProcessor, AutoTokenizer

    folder = lens.model.name_or_path
    ip, tok = AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    feats = ip(images=images, return_tensors="pt")
    merge = ip.merge_size
    rows = []
    for (t, h, w), text in zip(feats["image_grid_thw"].tolist(), texts):
        n = t * h * w // merge**2
        body = "<|vision_start|> " + " ".join(["<|image_pad|>"] * n) + " <|vision_end|> " + text
        rows.append(tok(body)["input_ids"])
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for k, r in enumerate(rows):  # left padding, as for generation
        ids[k, width - len(r):], mask[k, width - len(r):] = torch.tensor(r), 1
    image_id = lens.model.config.image_token_id
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": feats["pixel_values"],
            "image_grid_thw": feats["image_grid_thw"], "mm_token_type_ids": (ids == image_id).long()}
