"""LlavaModel: vision tower -> projector -> causal LM, with image tokens spliced into the LM's input embeddings.

Input ids carry IMAGE_TOKEN_ID (-200) at every image-token position (tokenize_conversation expands each
`<image>` to tower.num_tokens of them); `embed` replaces those positions, in reading order, by the projected
tokens of `images` (one image per placeholder, in the order the placeholders appear in the batch).

    model = LlavaModel(tower, AutoModelForCausalLM.from_pretrained(lm_dir), projector="mlp2x_gelu")
    loss = model(input_ids, attention_mask, images, labels).loss
    new_ids = model.generate(input_ids, attention_mask, images, max_new_tokens=8)   # left-padded prompts
"""

from __future__ import annotations

import torch
from torch import nn

from mllm.conversation import IMAGE_TOKEN_ID
from mllm.projector import build_projector
from mllm.towers import VisionTower


class LlavaModel(nn.Module):
    """A LLaVA-style model.

    Args:
        tower: the vision tower (tokens [B, N, tower.dim]).
        lm: a transformers causal LM (AutoModelForCausalLM), optionally wrapped by peft.
        projector: projector kind, "linear" or "mlpNx_gelu".
    """

    def __init__(self, tower: VisionTower, lm: nn.Module, projector: str = "mlp2x_gelu") -> None:
        super().__init__()
        self.tower = tower
        self.lm = lm
        self.projector = build_projector(projector, tower.dim, lm.config.hidden_size)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens [M, N, hidden] of M images."""
        return self.projector(self.tower(images))

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """LM input embeddings [B, T, hidden] with the projected image tokens at the IMAGE_TOKEN_ID positions."""
        image_mask = input_ids == IMAGE_TOKEN_ID
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        num_slots = int(image_mask.sum())
        if images is None or len(images) == 0:
            if num_slots:
                raise ValueError(f"input_ids hold {num_slots} image-token positions but no images were given.")
            return embeds
        features = self.image_features(images)
        if num_slots != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"input_ids hold {num_slots} image-token positions but {features.shape[0]} image(s) x "
                f"{features.shape[1]} tokens = {features.shape[0] * features.shape[1]} were produced; the data must "
                "expand each <image> to tower.num_tokens tokens and give one image per placeholder."
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        """The LM's output (with `.loss` when labels are given) on right- or left-padded batches."""
        return self.lm(inputs_embeds=self.embed(input_ids, images), attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        images: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding with the LM's KV cache from left-padded prompts; returns only the new token ids."""
        config = self.lm.config
        return self.lm.generate(
            inputs_embeds=self.embed(input_ids, images),
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=eos_token_id if eos_token_id is not None else config.eos_token_id,
            pad_token_id=pad_token_id if pad_token_id is not None else config.pad_token_id,
        )
