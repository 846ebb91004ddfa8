"""LightningDataModule for the LLaVA stages: a training source, an optional validation source, one tokenizer.

    data = LlavaDataModule(train=ToySource(stage="align"), val=ToySource(seed=1000, num_images=100),
                           num_image_tokens=module.model.tower.num_tokens)

The number of image tokens per image is the model's tower's (`unitower llava` links it when it builds both).
Training batches come from distill's `ResumableLoader`: their position is saved in every checkpoint,
so `--ckpt_path` continues with the next batch (see distill/data/resumable.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch.utils.data import DataLoader, Subset

from distill.common.skips import DataSkips
from distill.data.resumable import (
    CountedResumableData,
    ResumableLoader,
    consumed_batches,
    deterministic_stream,
    run_seed,
    trainer_rank,
)
from mllm.data import DataSource, SampleEncoder, ToySource, collate
from mllm.loading import load_tokenizer


class LlavaDataModule(CountedResumableData):
    """Training / validation data of one LLaVA stage.

    Args:
        train: training source (ToySource, LlavaJsonSource, WebDataSource).
        val: validation source (loss only); None = no validation.
        tokenizer: the LM's tokenizer (folder, hub name or 'toy:lm'); the CLI links it to model.lm.
        chat_template: template name/string; None = the tokenizer's own (CLI-linked to model.chat_template).
        system_prompt: optional system message for every conversation.
        max_length: max tokens per sample; longer ones are truncated (never inside image tokens) or skipped.
        image_size: side images are resized to before the tower's own preprocessing.
        pad_to_square: pad images to square with pad_color first (LLaVA-1.5's `image_aspect_ratio: pad`); else
            short-side resize + centre crop, as LLaVA's CLIPImageProcessor.
        pad_color: 0-255 RGB fill of pad_to_square; None = the CLIP processor mean [122, 116, 104] (LLaVA-1.5).
        image_first: move `<image>` to the front of its turn ("<image>\n" + text), as LLaVA's preprocess_multimodal.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        num_image_tokens: visual tokens per image of the model's tower. `unitower llava` sets it from the built
            model (`model.tower.num_tokens`, a link in mllm/cli.py); elsewhere pass it.
        max_skipped_fraction: stop the run (naming the worst files) once more than this fraction of the
            samples seen, records dropped at load included, was skipped (checked after 100; 1.0 never stops).
        seed: seed of the epoch order; None = the run's `seed_everything` value (0 when there is none).
    """

    def __init__(
        self,
        train: DataSource | None = None,
        val: DataSource | None = None,
        tokenizer: str = "toy:lm",
        chat_template: str | None = None,
        system_prompt: str | None = None,
        max_length: int = 512,
        image_size: int = 64,
        pad_to_square: bool = False,
        pad_color: list[int] | None = None,
        image_first: bool = False,
        batch_size: int = 16,
        num_workers: int = 0,
        num_image_tokens: int | None = None,
        max_skipped_fraction: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.train_source = train if train is not None else ToySource()
        self.val_source = val
        self.tokenizer_spec = tokenizer
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.max_length, self.image_size, self.pad_to_square = max_length, image_size, pad_to_square
        self.pad_color, self.image_first = pad_color, image_first
        self.batch_size, self.num_workers = batch_size, num_workers
        self.num_image_tokens, self.seed = num_image_tokens, seed
        self.tokenizer = None
        self.encoder: SampleEncoder | None = None
        self.skips = DataSkips(max_skipped_fraction)
        self.skips.record_load("train", *self.train_source.load_report())
        if val is not None:
            self.skips.record_load("val", *val.load_report())

    def setup(self, stage: str | None = None) -> None:
        if self.encoder is not None:
            return
        if self.num_image_tokens is None:
            raise ValueError("LlavaDataModule: num_image_tokens is not set. `unitower llava` links it from the model's "
                             "tower; when building the data module yourself pass num_image_tokens=module.model.tower.num_tokens.")
        self.tokenizer = load_tokenizer(self.tokenizer_spec)
        self.encoder = SampleEncoder(self.tokenizer, self.num_image_tokens, self.max_length, self.image_size,
                                     self.chat_template, self.system_prompt, self.pad_to_square, self.pad_color,
                                     self.image_first)

    def data_settings(self) -> dict:
        """What evaluation must reproduce; LlavaModule saves it into every checkpoint ("data_settings")."""
        return {"image_size": self.image_size, "pad_to_square": self.pad_to_square,
                "pad_color": None if self.pad_color is None else [int(v) for v in self.pad_color],
                "chat_template": self.chat_template, "system_prompt": self.system_prompt,
                "max_length": self.max_length, "image_first": self.image_first}

    def _collate(self) -> Callable[[list], dict]:
        return partial(collate, pad_token_id=self.tokenizer.pad_token_id)

    def train_dataloader(self) -> ResumableLoader:
        rank, world_size = trainer_rank(self.trainer)
        return ResumableLoader(
            self.train_source.dataset(self.encoder), self.batch_size, seed=run_seed(self.seed), shuffle=True,
            drop_last=False, num_workers=self.num_workers, collate_fn=self._collate(),
            rank=rank, world_size=world_size, consumed=consumed_batches(self.trainer),
            replay=deterministic_stream(self.train_source),
        )

    def calibration_loader(self, num_images: int) -> DataLoader:
        """The first `num_images` training records in source order (not shuffled, whatever the seed, the same for
        the live and the cached-feature source of one world): what a tower's "standardize" / "whiten" statistics
        are measured on (LlavaModule.on_fit_start)."""
        self.setup("fit")
        dataset = self.train_source.dataset(self.encoder)
        subset = Subset(dataset, range(min(num_images, len(dataset))))
        return DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self._collate())

    def val_dataloader(self) -> DataLoader | list:
        if self.val_source is None:
            return []
        return DataLoader(self.val_source.dataset(self.encoder), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=self._collate(),
                          persistent_workers=self.num_workers > 0)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Count the batch's skipped samples (main process, exact), log the running total, drop the markers."""
        batch = dict(batch)
        kept = 0 if batch["input_ids"] is None else len(batch["input_ids"])
        self.skips.record(self.trainer, batch.pop("skipped"), kept)
        return batch
