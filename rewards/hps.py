"""HPSv2.1 (Wu et al. 2023, "Human Preference Score v2"): an open_clip ViT-H-14 fine-tuned on human
preferences, run here on ``transformers.CLIPModel`` (no open_clip, torchvision or hpsv2 package needed).

Reference (``hpsv2.score``): open_clip ``ViT-H-14`` with the fine-tuned state dict
``checkpoint["state_dict"]`` of ``HPS_v2.1_compressed.pt`` (HF repo ``xswu/HPSv2``); the open_clip
tokenizer for ViT-H-14 (OpenAI CLIP BPE, 77 tokens, pooled at the end-of-text token, which has the
largest id); the eval image transform of HPSv2's open_clip fork (longest side resized to 224 with
bicubic resampling, padded with black to 224x224, CLIP mean/std: for the square images diffusion
models produce this is a plain resize); and

    score = cos(image_features, text_features)     (no logit scale; typically 0.2-0.35)

Conversion: :func:`convert_open_clip_state_dict` maps the open_clip layout onto ``CLIPModel``'s
(fused ``attn.in_proj_*`` split into q/k/v, ``proj``/``text_projection`` transposed, ``ln_pre`` →
``pre_layrnorm`` ...). The architecture is :class:`OpenClipArch` (ViT-H-14 by default; GELU, LayerNorm
eps 1e-5), since head counts cannot be read from tensor shapes. The tokenizer is the Hugging Face one
of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the same BPE vocabulary and special tokens as open_clip's).

Files are read locally only: ``hf download xswu/HPSv2 HPS_v2.1_compressed.pt`` (or
``$DENOISE_GYM_HPS_CHECKPOINT``) and the CLIP-H tokenizer files (the command is in the error when absent).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rewards.aesthetic import CLIP_MEAN, CLIP_STD
from rewards.base import RewardInfo, as_float_images
from rewards.clip_common import ClipTextImage
from rewards.hub import resolve_file
from rewards.pickscore import CLIP_TOKENIZER_FILES, PICKSCORE_PROCESSOR, load_tokenizer

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ENV = "DENOISE_GYM_HPS_CHECKPOINT"
HPS_TOKENIZER = PICKSCORE_PROCESSOR


@dataclass(frozen=True)
class OpenClipArch:
    """An open_clip ViT-CLIP's shape (defaults: ViT-H-14, the HPSv2 backbone)."""

    embed_dim: int = 1024
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1280
    vision_layers: int = 32
    vision_heads: int = 16
    vision_mlp: int = 5120
    text_width: int = 1024
    text_layers: int = 24
    text_heads: int = 16
    text_mlp: int = 4096
    context_length: int = 77
    vocab_size: int = 49408
    eot_token_id: int = 49407
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if k == "layer_norm_eps":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}={v!r}; expected a positive int")
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError(
                f"widths {self.vision_width}/{self.text_width} and heads {self.vision_heads}/{self.text_heads}; "
                "expected each width divisible by its head count"
            )

    def clip_config(self):
        from transformers import CLIPConfig

        text = dict(vocab_size=self.vocab_size, hidden_size=self.text_width, intermediate_size=self.text_mlp,
                    num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
                    max_position_embeddings=self.context_length, hidden_act="gelu",
                    layer_norm_eps=self.layer_norm_eps, bos_token_id=self.eot_token_id - 1,
                    eos_token_id=self.eot_token_id, pad_token_id=0)  # fmt: skip
        vision = dict(hidden_size=self.vision_width, intermediate_size=self.vision_mlp,
                      num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                      image_size=self.image_size, patch_size=self.patch_size, hidden_act="gelu",
                      layer_norm_eps=self.layer_norm_eps)  # fmt: skip
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.embed_dim)


VIT_H_14 = OpenClipArch()

_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip


def _convert_blocks(sd: Mapping[str, torch.Tensor], src: str, dst: str, layers: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i in range(layers):
        s, d = f"{src}.resblocks.{i}", f"{dst}.layers.{i}"
        for a, b in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{d}.{b}.{p}"] = sd[f"{s}.{a}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = sd[f"{s}.attn.in_proj_{p}"].chunk(3, dim=0)
            out[f"{d}.self_attn.q_proj.{p}"] = q
            out[f"{d}.self_attn.k_proj.{p}"] = k
            out[f"{d}.self_attn.v_proj.{p}"] = v
    return out


def convert_open_clip_state_dict(sd: Mapping[str, torch.Tensor], arch: OpenClipArch = VIT_H_14) -> dict[str, torch.Tensor]:
    """An open_clip ViT-CLIP state dict (``visual.*``, ``transformer.*``, ``token_embedding``, ...) as a
    ``transformers.CLIPModel`` state dict. A ``module.`` prefix (DDP checkpoints) is stripped.
    Raises ValueError naming the first missing key or mis-shaped tensor."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    try:
        out = {
            "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
            "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
            "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
            "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
            "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
            "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
            "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
            "visual_projection.weight": sd["visual.proj"].t(),
            "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
            "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
            "text_model.final_layer_norm.weight": sd["ln_final.weight"],
            "text_model.final_layer_norm.bias": sd["ln_final.bias"],
            "text_projection.weight": sd["text_projection"].t(),
            "logit_scale": sd["logit_scale"].reshape(()),
        }
        out.update(_convert_blocks(sd, "visual.transformer", "vision_model.encoder", arch.vision_layers))
        out.update(_convert_blocks(sd, "transformer", "text_model.encoder", arch.text_layers))
    except KeyError as e:
        raise ValueError(
            f"open_clip state dict has no key {e.args[0]!r}; expected an open_clip ViT-CLIP checkpoint "
            f"with {arch.vision_layers} vision and {arch.text_layers} text blocks"
        ) from None
    return {k: v.contiguous() for k, v in out.items()}


def build_clip_from_open_clip(sd: Mapping[str, torch.Tensor], arch: OpenClipArch = VIT_H_14):
    """A ``CLIPModel`` (float32, eval) holding the converted open_clip weights."""
    from transformers import CLIPModel

    model = CLIPModel(arch.clip_config())
    converted = convert_open_clip_state_dict(sd, arch)
    expected = model.state_dict()
    for k, v in converted.items():
        if k not in expected or tuple(expected[k].shape) != tuple(v.shape):
            want = tuple(expected[k].shape) if k in expected else "no such key"
            raise ValueError(f"{k} has shape {tuple(v.shape)}; expected {want} for {arch}")
    missing = [k for k in expected if k not in converted and not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"converted state dict lacks {missing[:3]}; expected every CLIPModel weight")
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    return model.eval()


def load_hps_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in an HPS checkpoint file (``{"state_dict": ...}`` or a bare state dict)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read HPS checkpoint {str(path)!r} as a torch file: {e}") from e
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"HPS checkpoint {str(path)!r} holds {type(ckpt).__name__}; expected a state dict")
    return dict(sd)


def resize_max_preprocess(
    images: Any,
    size: int,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """HPSv2's eval transform in torch: longest side → ``size`` (antialiased bicubic), centred black
    padding to ``size x size``, CLIP mean/std. Returns float32 ``[B, 3, size, size]``."""
    x = images.to(device) if (device is not None and isinstance(images, torch.Tensor)) else images
    x = as_float_images(x)
    if device is not None:
        x = x.to(device)
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    ph, pw = size - nh, size - nw
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class HPSv2Reward:
    """Reward = HPSv2.x score ``cos(image, prompt)`` of each pair (see the module docstring).

    ``checkpoint``: None (``$DENOISE_GYM_HPS_CHECKPOINT``, else the file of ``version`` from the HF
    cache), a path, an open_clip state dict, or a loaded ``CLIPModel``. ``version``: "v2.1" (default)
    or "v2.0". ``tokenizer``: repo id / directory / loaded tokenizer. ``arch``: the backbone's shape.
    """

    name = "hpsv2"

    def __init__(
        self,
        checkpoint: Any = None,
        tokenizer: Any = HPS_TOKENIZER,
        *,
        version: str = "v2.1",
        arch: OpenClipArch = VIT_H_14,
        device: torch.device | str | None = None,
        batch_size: int = 32,
        cache_dir: str | os.PathLike | None = None,
    ):
        if version not in HPS_FILES:
            raise ValueError(f"version={version!r}; expected one of {sorted(HPS_FILES)}")
        if not isinstance(arch, OpenClipArch):
            raise ValueError(f"arch is {type(arch).__name__}; expected an OpenClipArch")
        tok = load_tokenizer(tokenizer, what="HPS tokenizer (CLIP-H)", arg="tokenizer", cache_dir=cache_dir,
                             files=CLIP_TOKENIZER_FILES)  # fmt: skip
        if checkpoint is None or isinstance(checkpoint, (str, os.PathLike)):
            path = resolve_file(checkpoint, repo_id=HPS_REPO, filename=HPS_FILES[version],
                                what=f"HPS{version} checkpoint", env=HPS_ENV, arg="checkpoint",
                                cache_dir=cache_dir)  # fmt: skip
            checkpoint = load_hps_checkpoint(path)
        if isinstance(checkpoint, Mapping):
            checkpoint = build_clip_from_open_clip(checkpoint, arch)
        self.scorer = ClipTextImage(checkpoint, tok, device=device, batch_size=batch_size,
                                    max_length=arch.context_length, preprocess=resize_max_preprocess)  # fmt: skip
        self.version = version

    @property
    def device(self) -> torch.device:
        return self.scorer.device

    def __call__(self, images: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]:
        out_device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        cos = self.scorer.cosine(images, prompts)
        return cos.to(out_device, torch.float32), {}

    def __repr__(self) -> str:
        return f"HPSv2Reward(version={self.version!r}, device={self.device})"
