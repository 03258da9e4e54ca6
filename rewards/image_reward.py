"""ImageReward (Xu et al. 2023): BLIP (ViT-L/16 image encoder + BERT-base text encoder with
cross-attention to the image) and an MLP head, fine-tuned on 137k human preference comparisons.

Reference scoring (``ImageReward.score`` of the ``image-reward`` package, checkpoint
``ImageReward.pt`` of HF repo ``THUDM/ImageReward``):

1. image: shorter side to 224 (bicubic), centre crop 224, CLIP mean/std;
2. prompt: the BLIP tokenizer (``bert-base-uncased`` plus the ``[DEC]`` and ``[ENC]`` tokens: 30524
   ids), padded to and truncated at 35 tokens; the first token stays ``[CLS]``;
3. ``image_embeds = visual_encoder(image)`` (all tokens, after the final LayerNorm);
4. ``text_encoder(input_ids, attention_mask, encoder_hidden_states=image_embeds)`` (bidirectional
   self-attention, cross-attention to every image token in every layer) → hidden state of token 0;
5. MLP 768→1024→128→64→16→1 (dropout, no nonlinearities: the aesthetic head's layout) and
   ``(r - 0.16717362830052426) / 1.0333394966054072``.

Here the BLIP towers are ``transformers``' ``BlipVisionModel`` and ``BlipTextModel`` (no ``image-reward``
package, whose pinned dependencies would replace the user's torch/transformers, and no timm):
:func:`convert_image_reward_state_dict` maps the checkpoint's ``blip.visual_encoder.*`` (timm-style ViT:
``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp}``,
``norm``) onto ``BlipVisionModel`` and ``blip.text_encoder.*`` (BLIP's BERT, whose names
``BlipTextModel`` shares) unchanged; ``mlp.layers.*`` go to the head. :class:`BlipArch` gives the shape
(ViT-L/16: width 1024, 24 blocks, 16 heads, LayerNorm eps 1e-6; BERT-base: 768, 12, 12, eps 1e-12).

Files are read locally only: ``hf download THUDM/ImageReward ImageReward.pt`` (or
``$DENOISE_GYM_IMAGE_REWARD_CHECKPOINT``) and ``hf download google-bert/bert-base-uncased config.json
tokenizer.json tokenizer_config.json vocab.txt`` (the tokenizer).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from rewards.aesthetic import AestheticHead, clip_preprocess
from rewards.base import FollowsImages, RewardInfo, as_float_images, check_prompts
from rewards.hub import from_pretrained_local, resolve_file

IMAGE_REWARD_REPO = "THUDM/ImageReward"
IMAGE_REWARD_FILE = "ImageReward.pt"
IMAGE_REWARD_ENV = "DENOISE_GYM_IMAGE_REWARD_CHECKPOINT"
IMAGE_REWARD_TOKENIZER = "google-bert/bert-base-uncased"
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35


@dataclass(frozen=True)
class BlipArch:
    """Shape of ImageReward's BLIP (defaults: the published ViT-L/16 + BERT-base)."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    vision_eps: float = 1e-6
    vocab_size: int = 30524
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_mlp: int = 3072
    max_positions: int = 512
    text_eps: float = 1e-12

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if k.endswith("_eps"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}={v!r}; expected a positive int")

    def build(self) -> tuple[Any, Any]:
        """Fresh (random) ``BlipVisionModel`` and ``BlipTextModel`` of this shape, in eval mode."""
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=self.vision_width, intermediate_size=self.vision_mlp,
            num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
            image_size=self.image_size, patch_size=self.patch_size, layer_norm_eps=self.vision_eps,
            hidden_act="gelu"))  # fmt: skip
        text_cfg = BlipTextConfig(
            vocab_size=self.vocab_size, hidden_size=self.text_width, encoder_hidden_size=self.vision_width,
            intermediate_size=self.text_mlp, num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads, max_position_embeddings=self.max_positions,
            layer_norm_eps=self.text_eps, hidden_act="gelu", is_decoder=True,  # is_decoder: build cross-attention
            bos_token_id=None, sep_token_id=None, pad_token_id=0, eos_token_id=None)  # fmt: skip
        text = BlipTextModel(text_cfg, add_pooling_layer=False)
        return vision.eval(), text.eval()


IMAGE_REWARD_BLIP = BlipArch()

_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip


def convert_image_reward_state_dict(
    sd: Mapping[str, torch.Tensor], arch: BlipArch = IMAGE_REWARD_BLIP
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an ImageReward checkpoint into ``(vision, text, head)`` state dicts for ``BlipVisionModel``,
    ``BlipTextModel`` and :class:`rewards.aesthetic.AestheticHead`. Keys the reward does not use
    (e.g. BLIP's projection heads) are ignored; a missing one raises ValueError naming it."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    try:
        vision = {
            "embeddings.class_embedding": sd[v + "cls_token"],
            "embeddings.position_embedding": sd[v + "pos_embed"],
            "embeddings.patch_embedding.weight": sd[v + "patch_embed.proj.weight"],
            "embeddings.patch_embedding.bias": sd[v + "patch_embed.proj.bias"],
            "post_layernorm.weight": sd[v + "norm.weight"],
            "post_layernorm.bias": sd[v + "norm.bias"],
        }
        for i in range(arch.vision_layers):
            for a, b in _VIT_BLOCK.items():
                for p in ("weight", "bias"):
                    vision[f"encoder.layers.{i}.{b}.{p}"] = sd[f"{v}blocks.{i}.{a}.{p}"]
        head = {k: sd["mlp." + k] for k in ("layers.0.weight", "layers.0.bias", "layers.2.weight",
                                           "layers.2.bias", "layers.4.weight", "layers.4.bias",
                                           "layers.6.weight", "layers.6.bias", "layers.7.weight",
                                           "layers.7.bias")}  # fmt: skip
    except KeyError as e:
        raise ValueError(
            f"ImageReward state dict has no key {e.args[0]!r}; expected the layout of {IMAGE_REWARD_FILE} "
            f"(blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*) with {arch.vision_layers} ViT blocks"
        ) from None
    text = {k[len(t) :]: x for k, x in sd.items() if k.startswith(t) and not k.endswith("position_ids")}
    if not text:
        raise ValueError("ImageReward state dict has no 'blip.text_encoder.*' keys; expected BLIP's text encoder")
    return vision, text, head


def _load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    expected = {k: tuple(x.shape) for k, x in module.state_dict().items() if not k.endswith("position_ids")}
    for k, x in state.items():
        if k not in expected:
            raise ValueError(f"{what} weight {k!r} is unexpected; expected the keys of {type(module).__name__}")
        if tuple(x.shape) != expected[k]:
            raise ValueError(f"{what} weight {k} has shape {tuple(x.shape)}; expected {expected[k]}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{what} weights lack {missing[:3]}; expected all {len(expected)} of them")
    module.load_state_dict({k: x.float() for k, x in state.items()}, strict=False)


class ImageRewardModel(torch.nn.Module):
    """BLIP towers + head: ``forward(pixel_values, input_ids, attention_mask) -> normalised rewards [B]``."""

    def __init__(self, vision: Any, text: Any, head: AestheticHead, *, mean: float = IMAGE_REWARD_MEAN,
                 std: float = IMAGE_REWARD_STD):  # fmt: skip
        super().__init__()
        if head.in_dim != text.config.hidden_size:
            raise ValueError(f"head expects {head.in_dim}-d features but the text encoder is "
                             f"{text.config.hidden_size}-d; expected matching sizes (768)")  # fmt: skip
        self.vision, self.text, self.head = vision.eval(), text.eval(), head.eval()
        self.mean, self.std = float(mean), float(std)
        self.image_size = int(vision.config.image_size)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], arch: BlipArch = IMAGE_REWARD_BLIP) -> ImageRewardModel:
        vision_sd, text_sd, head_sd = convert_image_reward_state_dict(sd, arch)
        vision, text = arch.build()
        _load_strict(vision, vision_sd, "ImageReward vision")
        _load_strict(text, text_sd, "ImageReward text")
        return cls(vision, text, AestheticHead.from_state_dict(head_sd))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts, is_decoder=False)  # fmt: skip
        r = self.head(out.last_hidden_state[:, 0, :].float())
        return (r - self.mean) / self.std


def load_blip_tokenizer(name_or_path: Any = IMAGE_REWARD_TOKENIZER, *, cache_dir: str | os.PathLike | None = None):
    """BLIP's tokenizer: ``bert-base-uncased`` with ``[DEC]`` as bos and ``[ENC]`` added (ids 30522, 30523)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        return name_or_path
    from transformers import AutoTokenizer

    tok = from_pretrained_local(AutoTokenizer, name_or_path, what="ImageReward tokenizer (bert-base-uncased)",
                                arg="tokenizer", cache_dir=cache_dir,
                                files=("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"))  # fmt: skip
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardReward(FollowsImages):
    """Reward = ImageReward score of each (image, prompt) pair (roughly -2..2; see the module docstring).

    ``checkpoint``: None (``$DENOISE_GYM_IMAGE_REWARD_CHECKPOINT``, else ``ImageReward.pt`` from the HF
    cache), a path, a state dict, or an :class:`ImageRewardModel`. ``tokenizer``: repo id / directory /
    loaded tokenizer. ``device``: where to run (default: the model's device, then the images' device
    the first time they arrive on an accelerator), ``batch_size``.
    """

    name = "image_reward"

    def __init__(
        self,
        checkpoint: Any = None,
        tokenizer: Any = IMAGE_REWARD_TOKENIZER,
        *,
        arch: BlipArch = IMAGE_REWARD_BLIP,
        device: torch.device | str | None = None,
        batch_size: int = 32,
        cache_dir: str | os.PathLike | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected a positive int")
        self.tokenizer = load_blip_tokenizer(tokenizer, cache_dir=cache_dir)
        if checkpoint is None or isinstance(checkpoint, (str, os.PathLike)):
            path = resolve_file(checkpoint, repo_id=IMAGE_REWARD_REPO, filename=IMAGE_REWARD_FILE,
                                what="ImageReward checkpoint", env=IMAGE_REWARD_ENV, arg="checkpoint",
                                cache_dir=cache_dir)  # fmt: skip
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"could not read ImageReward checkpoint {str(path)!r}: {e}") from e
        if isinstance(checkpoint, Mapping):
            checkpoint = ImageRewardModel.from_state_dict(checkpoint, arch)
        if not isinstance(checkpoint, ImageRewardModel):
            raise ValueError(f"checkpoint is {type(checkpoint).__name__}; expected None, a path, a state dict "
                             "or an ImageRewardModel")  # fmt: skip
        self._place(checkpoint, device)  # device None: follow images that arrive on an accelerator
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, RewardInfo]:
        x = images if isinstance(images, torch.Tensor) else as_float_images(images)
        if x.ndim != 4 or x.shape[1] != 3:
            as_float_images(x)  # raises the canonical ValueError
        prompts = check_prompts(prompts, x.shape[0])
        self.follow(x.device)
        out = []
        for s in range(0, x.shape[0], self.batch_size):
            pix = clip_preprocess(x[s : s + self.batch_size], self.model.image_size, device=self.device)
            tok = self.tokenizer(prompts[s : s + self.batch_size], padding="max_length", truncation=True,
                                 max_length=MAX_TEXT_LENGTH, return_tensors="pt")  # fmt: skip
            out.append(self.model(pix.to(self.dtype), tok["input_ids"].to(self.device),
                                  tok["attention_mask"].to(self.device)).float())  # fmt: skip
        return torch.cat(out).to(x.device, torch.float32), {}

    def __repr__(self) -> str:
        return f"ImageRewardReward(device={self.device}, batch_size={self.batch_size})"
