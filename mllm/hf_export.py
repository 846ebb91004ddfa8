"""Export a trained unitower LLaVA to a Hugging Face transformers folder (LlavaForConditionalGeneration + processor).

    python -m mllm export --ckpt runs/mllm/toy_clip/finetune.ckpt --out runs/hf/toy_clip
    model = LlavaForConditionalGeneration.from_pretrained(out); processor = AutoProcessor.from_pretrained(out)

What maps (transformers' Llava is CLIP-like vision model -> 2-layer MLP projector -> causal LM):
- tower: a SingleEncoderTower over an open_clip ViT (OpenClipEncoder) -> CLIPVisionModel weights (conv1 ->
  patch_embedding, class_embedding, positional_embedding, ln_pre -> pre_layrnorm, resblocks -> encoder.layers with
  the fused in_proj split into q/k/v, GELU or QuickGELU kept). `layer` -> `vision_feature_layer` (hidden_states
  index), keep_cls -> `vision_feature_select_strategy` "full", else "default" (drops the CLS token).
- tower: a StudentTower (the distilled student) with one prefix token -> Dinov2Model (mllm/hf_student.py: the
  student's timm ViT block for block, its input conditioner in the processor, its position embedding at the
  tower's grid, CPE window included; `layer` -> vision_feature_layer, summary token dropped unless keep_cls).
- projector: "mlp2x_gelu" -> multi_modal_projector.linear_1 / act (gelu) / linear_2.
- LM: the causal LM's base model -> model.language_model, lm_head -> lm_head; LoRA adapters are merged (in place).
- processor: the tokenizer with `<image>` added (a new id past the LM's vocabulary: one zero embedding row, and
  generation_config.suppress_tokens keeps generate from emitting it), the chat template (the processor's version also
  takes content lists such as [{"type": "image"}, {"type": "text", ...}]), and a CLIP image processor that resizes
  the short side to the tower's input size (bicubic), centre-crops and normalizes with its mean/std, as
  unitower's data path does. Load it with
  `AutoProcessor.from_pretrained(out, backend="pil")` for pixels identical to unitower's PIL resize; the default
  torchvision backend resizes slightly differently (max abs 0.015 after normalization on a resized toy image).
- weights are written in float32 (the dtype transformers builds the model in).

Refused with an ExportError that says why (exactly what remains unexportable):
- ensemble towers and every fusion module (channel / sequence concatenation, per-encoder projectors,
  resamplers, multi-layer merges): transformers' Llava runs exactly one vision model and hands its hidden states
  to the projector unchanged, so several encoders and a fusion between them need model code of their own
  (trust_remote_code), which this export does not write;
- timm towers (see _refuse_timm: Llava reads NCHW maps from TimmWrapper's hidden states, and TimmWrapperConfig
  has no hidden_size for its projector);
- students with several prefix tokens (summary tokens + registers, as the toy and RADIO recipes distill), the
  student's final layer, adaptor features (see mllm/hf_student.py for why);
- a `grid` that resamples the token map, the final layer of an open_clip ViT (layer -1 applies ln_post to patch
  tokens; CLIPVisionModel's hidden states are pre-norm), open_clip ViTs with layer scale / attention pooling / no
  ln_pre, other projectors.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.common.io import write_dir
from distill.common.state_dicts import key_differences
from mllm.conversation import IMAGE_PLACEHOLDER, LlavaTemplate, llava_template_jinja, resolve_chat_template
from mllm.hf_student import ExportError, student_vision_export
from mllm.model import LlavaModel
from mllm.towers import EnsembleTower, SingleEncoderTower, StudentTower, VisionTower

# Prepended to the chat template for the processor: turns content lists into the plain strings unitower renders
# (an image item becomes "<image>", items are joined by a newline, as unitower prompts "<image>\n{question}").
_CONTENT_LIST_PRELUDE = (
    "{%- set _flat = namespace(messages=[]) -%}"
    "{%- for _m in messages -%}"
    "{%- if _m['content'] is string -%}{%- set _flat.messages = _flat.messages + [_m] -%}"
    "{%- else -%}{%- set _parts = namespace(items=[]) -%}"
    "{%- for _c in _m['content'] -%}"
    "{%- if _c['type'] == 'image' -%}{%- set _parts.items = _parts.items + ['" + IMAGE_PLACEHOLDER + "'] -%}"
    "{%- elif _c['type'] == 'text' -%}{%- set _parts.items = _parts.items + [_c['text']] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _flat.messages = _flat.messages + [{'role': _m['role'], 'content': _parts.items | join('\\n')}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = _flat.messages -%}"
)


def export_checkpoint(ckpt_path: str, out_dir: str, image_size: int | None = None) -> Path:
    """Load a `python -m mllm fit` checkpoint and write its transformers folder to `out_dir` (see export_model).

    image_size: the side images were resized to in training (data `image_size`); None = the checkpoint's
        datamodule setting when it holds one, else the tower's input size.
    """
    from mllm.loading import load_tokenizer
    from mllm.module import LlavaModule  # lazy: keeps the mapping code Lightning-free

    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint '{ckpt_path}' does not exist; pass a .ckpt written by `python -m mllm fit`.")
    data = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters") or {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
        module = LlavaModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    hp = module.hparams
    return export_model(module.model, load_tokenizer(hp.lm), out_dir, chat_template=hp.chat_template,
                        image_size=image_size or data.get("image_size"), pad_to_square=bool(data.get("pad_to_square")))


def export_model(
    model: LlavaModel,
    tokenizer: Any,
    out_dir: str,
    chat_template: str | None = None,
    image_size: int | None = None,
    pad_to_square: bool = False,
) -> Path:
    """Write `model` + `tokenizer` as a LlavaForConditionalGeneration folder loadable by AutoProcessor; returns it.

    chat_template: the template the model was trained with (name or jinja); None = the tokenizer's own.
    image_size: side unitower resized images to before the tower; None = the tower's input size.
    pad_to_square: the data padded images to square first (LlavaImageProcessor do_pad, see _image_processor).
    Raises ExportError for a tower / projector transformers cannot express.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    extra = sorted(name for name, _ in model.named_children() if name not in ("tower", "projector", "lm"))
    if extra:
        raise ExportError(
            f"LlavaModel has modules {extra} between or beside tower, projector and LM (e.g. a fusion module); "
            "transformers' Llava is vision model -> 2-layer MLP projector -> LM with nothing else, so these need model "
            "code of their own (trust_remote_code), which this export does not write. Evaluate with `unitower llava "
            "evaluate` or mllm/lmms_eval.py instead.")
    vision = vision_export(model.tower)
    projector = _projector_state(model.projector)
    lm = _merged_lm(model.lm)
    tokenizer = _with_image_token(tokenizer, chat_template)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    text_config = lm.config.to_dict()
    vocab_size = max(lm.config.vocab_size, len(tokenizer))
    text_config["vocab_size"] = vocab_size
    config = LlavaConfig(
        vision_config=vision["config"],
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=model.tower.num_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=vision["feature_layer"],
        vision_feature_select_strategy=vision["select_strategy"],
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    state = {f"model.vision_tower.{k}": v for k, v in vision["state"].items()}
    state.update({f"model.multi_modal_projector.{k}": v for k, v in projector.items()})
    state.update(_lm_state(lm, vocab_size))
    hf_model = LlavaForConditionalGeneration(config).eval()
    _load(hf_model, state)
    hf_model.generation_config = _generation_config(lm, tokenizer, image_token_id)
    processor = _processor(tokenizer, vision, model.tower.num_tokens, image_size, pad_to_square)
    return _write(out_dir, hf_model, processor)


def _load(hf_model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the freshly built Llava; every weight must be covered (tied lm_head aside)."""
    own = hf_model.state_dict()
    tied = {"lm_head.weight"} if hf_model.config.tie_word_embeddings else set()
    missing, unexpected, wrong = key_differences(own, state, ignore=tied)
    if missing or unexpected or wrong:
        raise ExportError(f"internal mapping error: transformers' Llava lacks {unexpected[:5]}, needs {missing[:5]}, "
                          f"has other shapes {wrong[:5]}; the installed transformers names its weights differently.")
    with torch.no_grad():
        hf_model.load_state_dict(state, strict=False)
    hf_model.tie_weights()


# ---------------------------------------------------------------- vision


def vision_export(tower: VisionTower) -> dict:
    """{config: CLIPVisionConfig, state: CLIPVisionModel weights, feature_layer, select_strategy, preprocess} of a tower.

    Raises ExportError when transformers' Llava cannot compute the tower's tokens.
    """
    from distill.encoders.clip import OpenClipEncoder
    from distill.encoders.timm_vit import TimmEncoder

    if isinstance(tower, EnsembleTower):
        raise ExportError(
            f"EnsembleTower ({len(tower.encoders)} encoders, fusion='{tower.fusion}') cannot be exported: transformers' "
            "LlavaForConditionalGeneration runs exactly one vision model and takes its hidden states as they are, so "
            "fusing several encoders (resampled to a common grid and concatenated) needs custom model code "
            "(trust_remote_code), which this export does not write. Evaluate it with `python -m mllm evaluate` or the "
            "lmms-eval entry mllm/lmms_eval.py instead."
        )
    if tower.norm != "none":  # issue 20: Llava feeds the vision model's hidden states to the projector as they are
        raise ExportError(f"{type(tower).__name__}(norm='{tower.norm}') cannot be exported: transformers' Llava has no "
                          "normalisation between the vision model and the projector; train with norm: none to export.")
    if isinstance(tower, StudentTower):
        return student_vision_export(tower)
    if not isinstance(tower, SingleEncoderTower):
        raise ExportError(f"{type(tower).__name__} is not a tower this export knows; only SingleEncoderTower maps.")
    encoder = tower.encoder
    if isinstance(encoder, TimmEncoder):
        _refuse_timm(encoder)
    if not isinstance(encoder, OpenClipEncoder):
        raise ExportError(
            f"SingleEncoderTower({type(encoder).__name__}) cannot be exported: only open_clip ViT encoders map onto a "
            "transformers vision model (CLIPVisionModel) that LlavaForConditionalGeneration can run."
        )
    config, state, num_blocks = clip_vision_weights(encoder)
    grid = config.image_size // config.patch_size
    if tower.grid is not None and tower.grid != grid:
        raise ExportError(
            f"SingleEncoderTower(grid={tower.grid}) resamples the encoder's {grid}x{grid} token map to "
            f"{tower.grid}x{tower.grid} (adaptive pooling / bilinear); transformers' Llava feeds the vision model's "
            f"tokens to the projector unchanged, so it cannot express this. Train with grid: null (or grid: {grid})."
        )
    block = encoder.layer % num_blocks
    return {
        "config": config,
        "state": state,
        "feature_layer": block - num_blocks,  # hidden_states[0] is the embedding output, [i + 1] block i's output
        "select_strategy": "full" if tower.keep_cls else "default",
        "preprocess": encoder.preprocess_cfg,
    }


def _refuse_timm(encoder: Any) -> None:
    raise ExportError(
        "SingleEncoderTower(TimmEncoder) cannot be exported: transformers' LlavaForConditionalGeneration takes "
        "`vision_tower(...).hidden_states[vision_feature_layer]` as [batch, tokens, channels], but TimmWrapperModel's "
        "hidden_states come from timm forward_intermediates in NCHW layout without the prefix tokens, so Llava would "
        "project [batch, channels, h, w] maps along the wrong axis (and its 'default' strategy would drop a channel "
        "instead of the CLS token); its projector also reads vision_config.hidden_size, which TimmWrapperConfig lacks. "
        "This needs custom model code (trust_remote_code). Export an open_clip ViT tower, or evaluate with the "
        "lmms-eval entry mllm/lmms_eval.py."
    )


def clip_vision_weights(encoder: Any) -> tuple[Any, dict[str, torch.Tensor], int]:
    """(CLIPVisionConfig, CLIPVisionModel state dict, number of blocks) of an OpenClipEncoder's ViT."""
    from open_clip.transformer import LayerNorm, ResidualAttentionBlock, VisionTransformer
    from transformers import CLIPVisionConfig

    visual = encoder.visual
    what = "OpenClipEncoder"
    if not isinstance(visual, VisionTransformer):
        raise ExportError(f"{what}: its image tower is {type(visual).__name__}, not an open_clip VisionTransformer; "
                          "only ViT towers map onto CLIPVisionModel.")
    if encoder.layer == -1 or encoder.layer % len(visual.transformer.resblocks) == len(visual.transformer.resblocks) - 1:
        raise ExportError(
            f"{what}(layer={encoder.layer}): the final layer's dense tokens pass through ln_post, but CLIPVisionModel's "
            "hidden states (what Llava reads) are taken before post_layernorm, and only its pooled CLS token is "
            "normalized. Train with layer: -2 (LLaVA-1.5's choice) or another non-final block."
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise ExportError(f"{what}: attentional pooling has no CLIPVisionModel equivalent.")
    if not isinstance(visual.ln_pre, (nn.LayerNorm, LayerNorm)):
        raise ExportError(f"{what}: the ViT has no ln_pre (no_ln_pre=True); CLIPVisionModel always applies pre_layrnorm.")
    if visual.conv1.bias is not None:
        raise ExportError(f"{what}: the patch embedding has a bias; CLIPVisionModel's patch_embedding has none.")
    patch_h, patch_w = visual.patch_size
    image_h, image_w = visual.image_size
    if patch_h != patch_w or image_h != image_w:
        raise ExportError(f"{what}: non-square image {visual.image_size} / patch {visual.patch_size}; CLIPVisionModel is square.")
    if tuple(encoder.input_size) != (image_h, image_w):
        raise ExportError(f"{what}: runs at {encoder.input_size} but its ViT was built for {visual.image_size}.")
    blocks = list(visual.transformer.resblocks)
    for index, block in enumerate(blocks):
        if (type(block) is not ResidualAttentionBlock or not isinstance(block.attn, nn.MultiheadAttention)
                or not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity)):
            raise ExportError(f"{what}: block {index} ({type(block).__name__}) uses layer scale or a custom attention; "
                              "CLIPEncoderLayer has neither.")
    config = CLIPVisionConfig(
        hidden_size=visual.transformer.width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        num_channels=3,
        image_size=image_h,
        patch_size=patch_h,
        hidden_act=_activation_name(blocks[0].mlp.gelu, what),
        layer_norm_eps=blocks[0].ln_1.eps,
        projection_dim=getattr(visual, "output_dim", None) or visual.transformer.width,
    )
    state = {
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.position_embedding.weight": visual.positional_embedding,
        "pre_layrnorm.weight": visual.ln_pre.weight,
        "pre_layrnorm.bias": visual.ln_pre.bias,
        "post_layernorm.weight": visual.ln_post.weight,
        "post_layernorm.bias": visual.ln_post.bias,
    }
    for index, block in enumerate(blocks):
        prefix = f"encoder.layers.{index}."
        q, k, v = block.attn.in_proj_weight.chunk(3)
        q_bias, k_bias, v_bias = block.attn.in_proj_bias.chunk(3)
        state.update({
            prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.q_proj.bias": q_bias,
            prefix + "self_attn.k_proj.weight": k, prefix + "self_attn.k_proj.bias": k_bias,
            prefix + "self_attn.v_proj.weight": v, prefix + "self_attn.v_proj.bias": v_bias,
            prefix + "self_attn.out_proj.weight": block.attn.out_proj.weight,
            prefix + "self_attn.out_proj.bias": block.attn.out_proj.bias,
            prefix + "layer_norm1.weight": block.ln_1.weight, prefix + "layer_norm1.bias": block.ln_1.bias,
            prefix + "layer_norm2.weight": block.ln_2.weight, prefix + "layer_norm2.bias": block.ln_2.bias,
            prefix + "mlp.fc1.weight": block.mlp.c_fc.weight, prefix + "mlp.fc1.bias": block.mlp.c_fc.bias,
            prefix + "mlp.fc2.weight": block.mlp.c_proj.weight, prefix + "mlp.fc2.bias": block.mlp.c_proj.bias,
        })
    return config, state, len(blocks)


def _activation_name(act: nn.Module, what: str) -> str:
    """transformers' ACT2FN name of an open_clip MLP activation (QuickGELU for OpenAI weights, exact GELU otherwise)."""
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    raise ExportError(f"{what}: MLP activation {type(act).__name__} has no transformers CLIP equivalent.")


# ---------------------------------------------------------------- projector and LM


def _projector_state(projector: nn.Module) -> dict[str, torch.Tensor]:
    """mlp2x_gelu (Linear, GELU, Linear) -> LlavaMultiModalProjector's linear_1 / linear_2."""
    layers = list(projector) if isinstance(projector, nn.Sequential) else [projector]
    kinds = [type(layer) for layer in layers]
    if kinds != [nn.Linear, nn.GELU, nn.Linear] or layers[1].approximate != "none":
        raise ExportError(
            f"projector {kinds} cannot be exported: transformers' LlavaMultiModalProjector is exactly linear_1 -> "
            "gelu -> linear_2, i.e. unitower's 'mlp2x_gelu'. Train with projector: mlp2x_gelu."
        )
    return {"linear_1.weight": layers[0].weight, "linear_1.bias": layers[0].bias,
            "linear_2.weight": layers[2].weight, "linear_2.bias": layers[2].bias}


def _merged_lm(lm: nn.Module) -> nn.Module:
    """The plain transformers LM: peft LoRA adapters merged into the base weights (in place)."""
    if hasattr(lm, "merge_and_unload"):
        return lm.merge_and_unload()
    return lm


def _lm_state(lm: nn.Module, vocab_size: int) -> dict[str, torch.Tensor]:
    """Causal LM weights under Llava's names, embedding rows padded with zeros to `vocab_size` (the new <image> id)."""
    prefix = lm.base_model_prefix + "."
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    input_name = next(name for name, p in lm.named_parameters() if p is lm.get_input_embeddings().weight)
    state = {}
    for name, tensor in lm.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        if name.startswith(prefix):
            key = "model.language_model." + name[len(prefix):]
        elif name.startswith("lm_head."):
            key = name
        else:
            raise ExportError(f"LM weight '{name}' is outside '{prefix}*' and 'lm_head.*'; transformers' Llava "
                              "expects a causal LM whose base model sits under `base_model_prefix`.")
        if name in (input_name, "lm_head.weight") and tensor.shape[0] < vocab_size:
            tensor = torch.cat([tensor, tensor.new_zeros(vocab_size - tensor.shape[0], *tensor.shape[1:])])
        state[key] = tensor
    return state


def _generation_config(lm: nn.Module, tokenizer: Any, image_token_id: int):
    """Greedy defaults with the tokenizer's eos / pad (as unitower's generate) and the <image> id suppressed."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else lm.config.bos_token_id,
        eos_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else lm.config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else lm.config.pad_token_id,
        do_sample=False,
        suppress_tokens=[image_token_id],
    )


# ---------------------------------------------------------------- processor


def _with_image_token(tokenizer: Any, chat_template: str | None) -> Any:
    """A copy of the tokenizer with `<image>` as a special token and the training chat template set."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    template = resolve_chat_template(tokenizer, chat_template)
    if isinstance(template, LlavaTemplate):  # "vicuna_v1", "plain": rendered in Python by unitower, jinja here
        bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
        template = llava_template_jinja(template, bos)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    tokenizer.chat_template = template
    return tokenizer


def _image_processor(preprocess: dict, image_size: int, pad_to_square: bool):
    """CLIP (or LLaVA, with pad_to_square) PIL image processor: short side to image_size, centre crop, rescale,
    normalize (unitower's data path, mllm.data.encode.image_to_tensor)."""
    from transformers.image_utils import PILImageResampling

    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}.get(
        preprocess.get("interpolation", "bicubic"), PILImageResampling.BICUBIC)
    kwargs = dict(
        do_resize=True, size={"shortest_edge": image_size}, resample=resample,
        do_center_crop=True, crop_size={"height": image_size, "width": image_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(preprocess["mean"]), image_std=list(preprocess["std"]), do_convert_rgb=True,
    )
    if pad_to_square:
        from transformers import LlavaImageProcessorPil

        # both pad with the processor mean colour (unitower's default pad_color for CLIP towers)
        return LlavaImageProcessorPil(do_pad=True, **kwargs)
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**kwargs)


def _processor(tokenizer: Any, vision: dict, num_tokens: int, image_size: int | None, pad_to_square: bool):
    from transformers import LlavaProcessor

    side = vision["config"].image_size
    if image_size is not None and image_size != side:
        warnings.warn(
            f"training resized images to {image_size} px before the tower resized them to {side} px; the exported "
            f"processor resizes once, to {side} px, so pixels differ slightly from unitower's two-step resize."
        )
    image_processor = _image_processor(vision["preprocess"], side, pad_to_square)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision["config"].patch_size,
        vision_feature_select_strategy=vision["select_strategy"],
        chat_template=_CONTENT_LIST_PRELUDE + tokenizer.chat_template,
        image_token=IMAGE_PLACEHOLDER,
        num_additional_image_tokens=1,  # the CLS token
    )
    grid = side // vision["config"].patch_size
    expected = grid * grid + (1 if vision["select_strategy"] == "full" else 0)
    if expected != num_tokens:
        raise ExportError(f"internal mapping error: the processor would insert {expected} image tokens per image but "
                          f"the tower produces {num_tokens}.")
    return processor


def _write(out_dir: str, hf_model: nn.Module, processor: Any) -> Path:
    """save_pretrained of model and processor into a temp folder that replaces out_dir when complete."""

    def write(folder: Path) -> None:
        hf_model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)

    return write_dir(out_dir, write)


def export_main(argv: list[str]) -> None:
    """`python -m mllm export --ckpt X --out DIR [--image-size N]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mllm export",
                                     description="Write a LLaVA checkpoint as a transformers LlavaForConditionalGeneration folder.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `python -m mllm fit`")
    parser.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side images were resized to in training (default: the checkpoint's, else the tower's)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, args.image_size)
    except ExportError as error:
        raise SystemExit(f"python -m mllm export: {error}") from None
    print(f"wrote {out}: load with LlavaForConditionalGeneration.from_pretrained / AutoProcessor.from_pretrained")
