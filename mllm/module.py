"""LightningModule for the LLaVA-1.5 stages: wiring, freezing, optimizers, small checkpoints.

Stages:
    align     only the projector trains (caption data); the LM is frozen.
    finetune  projector and LM train (or LoRA adapters via peft); starts from an align checkpoint
              given as `init_from`.
The tower's fusion module (mllm/fusion.py; e.g. BRAVE's resampler) trains in both stages. Separate learning
rates for projector, fusion, LM and (if trainable) the tower's encoders; AdamW with linear warmup and
cosine decay. Checkpoints hold only the trained parameters (frozen weights come from their own files).

    module = LlavaModule(tower=SingleEncoderTower(enc), lm="toy:lm", stage="align")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch

from distill.common.io import load_weights
from mllm.loading import load_lm
from mllm.model import LlavaModel
from distill.common.schedule import warmup_cosine
from mllm.towers import VisionTower


@dataclass
class LoraOptions:
    """LoRA on the LM through peft (finetune stage).

    The defaults are LLaVA-1.5's scripts/v1_5/finetune_lora.sh (use them with lm_lr 2e-4, projector_lr 2e-5).

    r: adapter rank (LLaVA-1.5: 128).
    alpha: scale numerator; updates are scaled by alpha / r (LLaVA-1.5: 256).
    dropout: dropout on the adapter input (LLaVA-1.5: 0.05).
    target_modules: LM layer names to adapt; "all-linear" = every linear layer of the LM except its output head
        (LLaVA's find_all_linear_names), or a list such as ["q_proj", "k_proj", "v_proj", "o_proj"].
    """

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


class LlavaModule(L.LightningModule):
    """One LLaVA training stage.

    Args:
        tower: the vision tower (SingleEncoderTower, EnsembleTower, StudentTower).
        lm: causal LM folder, hub name, or 'toy:lm'.
        projector: "linear" or "mlpNx_gelu" (LLaVA-1.5: "mlp2x_gelu").
        stage: "align" (projector only) or "finetune" (projector + LM).
        init_from: checkpoint (.ckpt of this module) whose weights are loaded first, e.g. the align stage's.
        projector_lr: learning rate of the projector.
        lm_lr: learning rate of the LM (finetune).
        tower_lr: learning rate of the tower's encoders (only when the tower is trainable).
        fusion_lr: learning rate of the tower's fusion module (when it has parameters); None = projector_lr.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the training steps with linear warmup before cosine decay.
        lora: LoRA options for the finetune stage; None = full finetuning.
        chat_template: template name/string (CLI-linked to the data); None = the tokenizer's own.
        gradient_checkpointing: recompute LM activations in backward to save memory.
        norm_calibration_images: for a tower with norm "standardize" / "whiten": how many training records (the
            training source's first ones, in order, whatever the seed) measure its statistics at the start of the
            first stage, when neither `init_from` nor the resumed checkpoint holds them. The live and the cached
            path read the same images, so they measure the same statistics.
    """

    def __init__(
        self,
        tower: VisionTower,
        lm: str = "toy:lm",
        projector: str = "mlp2x_gelu",
        stage: Literal["align", "finetune"] = "align",
        init_from: str | None = None,
        projector_lr: float = 1e-3,
        lm_lr: float = 2e-5,
        tower_lr: float = 2e-6,
        fusion_lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        lora: LoraOptions | None = None,
        chat_template: str | None = None,
        gradient_checkpointing: bool = False,
        norm_calibration_images: int = 2048,
    ) -> None:
        super().__init__()
        if stage not in ("align", "finetune"):
            raise ValueError(f"stage='{stage}' is unknown; use 'align' or 'finetune'.")
        # A tower object passed directly is not a hyper-parameter. Built from a config (LightningCLI, or
        # load_from_checkpoint of a CLI checkpoint), Lightning hands save_hyperparameters that config, marked by
        # its `_instantiator` entry: then the tower's class_path/init_args are kept so load_from_checkpoint can
        # rebuild it.
        self.save_hyperparameters(ignore=["tower"])
        if "_instantiator" in self.hparams:
            self.save_hyperparameters()
        self.strict_loading = False  # checkpoints hold only trained weights
        language_model = load_lm(lm)
        if gradient_checkpointing:
            language_model.gradient_checkpointing_enable()
        self.model = LlavaModel(tower, language_model, projector)
        if init_from:
            load_trained_weights(self, init_from)
        self.model.lm.requires_grad_(stage == "finetune" and lora is None)
        self.model.lm.train(stage == "finetune")  # from_pretrained returns eval mode; a frozen LM stays there
        if stage == "finetune" and lora is not None:
            self.model.lm = _with_lora(self.model.lm, lora)
        self.model.projector.requires_grad_(True)
        # Image size, padding, template, ... of the training data (LlavaDataModule.data_settings); saved into
        # checkpoints so `python -m mllm evaluate` reproduces them.
        self.data_settings: dict = {}

    def on_fit_start(self) -> None:
        # runs after a resumed checkpoint is restored and after init_from (both hold the statistics): measured once
        if self.model.tower.needs_calibration:
            self.calibrate_tower(getattr(self.trainer, "datamodule", None))

    def calibrate_tower(self, datamodule) -> None:
        """Measure the tower's "standardize" / "whiten" statistics on the first `norm_calibration_images` training
        records of `datamodule` (a LlavaDataModule; its calibration_loader)."""
        tower = self.model.tower
        if not hasattr(datamodule, "calibration_loader"):
            raise ValueError(f"{type(tower).__name__}(norm='{tower.norm}') must measure its statistics on training "
                             "images, but the trainer has no LlavaDataModule; fit with one, or call "
                             "module.calibrate_tower(datamodule) first.")
        loader = datamodule.calibration_loader(self.hparams.get("norm_calibration_images", 2048))
        tower.calibrate(_raw_features(tower, loader, self.device))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"]).loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        # Skipped samples are counted (running total `train/skipped`) by the DataModule's on_before_batch_transfer.
        if batch["input_ids"] is None:
            return None  # every sample of this batch was skipped
        loss = self(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if batch["input_ids"] is None:
            return None
        loss = self(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: projector, fusion, LM and tower-encoder trainable parameters, each with its own learning
        rate (`name` says which)."""
        hp = self.hparams
        fusion = getattr(self.model.tower, "fusion", None)
        fusion_ids = {id(p) for p in fusion.parameters()} if fusion is not None else set()
        fusion_lr = hp.get("fusion_lr") or hp.projector_lr
        parts = (("projector", self.model.projector.parameters(), hp.projector_lr),
                 ("fusion", fusion.parameters() if fusion is not None else [], fusion_lr),
                 ("lm", self.model.lm.parameters(), hp.lm_lr),
                 ("tower", (p for p in self.model.tower.parameters() if id(p) not in fusion_ids), hp.tower_lr))
        groups = []
        for name, params, lr in parts:
            params = [p for p in params if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": lr, "name": name})
        return groups

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.hparams.warmup_ratio * total))
        scheduler = warmup_cosine(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trained_parameter_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def token_stats_names(self) -> set[str]:
        """The tower's measured normalisation statistics (TokenStats buffers): saved with the trained weights."""
        return {name for name, _ in self.named_buffers() if ".token_stats." in name}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kept = self.trained_parameter_names() | self.token_stats_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in kept}
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(datamodule, "data_settings"):
            self.data_settings = datamodule.data_settings()
        if self.data_settings:
            checkpoint["data_settings"] = dict(self.data_settings)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        _check_keys(self, checkpoint["state_dict"], "checkpoint")
        self.data_settings = dict(checkpoint.get("data_settings") or {})


@torch.no_grad()
def _raw_features(tower: VisionTower, loader, device: torch.device):
    """The tower's raw `features` of each batch of `loader` (pixels for a live tower, cached rows for CachedTower)."""
    was_training = tower.training
    tower.eval()
    try:
        for batch in loader:
            if batch["images"] is not None:
                yield [f.float() for f in tower.features(batch["images"].to(device))]
    finally:
        tower.train(was_training)


def _with_lora(lm: torch.nn.Module, lora: LoraOptions) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model  # lazy: peft is only needed for LoRA

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(lm, config)


def _check_keys(module: torch.nn.Module, state: dict, source: str) -> None:
    """Raise if `state` has keys the module lacks or tensors whose shapes differ (e.g. a projector for another tower)."""
    own = module.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} weights do not belong to this model (first: {unknown[:3]}); "
                         "was it trained with another LM, projector or LoRA setting?")
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"{source}: weight shapes do not fit this model ({wrong[:3]}); the projector's input width "
                         "must equal the tower's `dim` and its output the LM's hidden size.")


def load_trained_weights(module: LlavaModule, path: str) -> None:
    """Load a LlavaModule checkpoint's (trained-only) weights into `module`, e.g. the align stage's projector."""
    state = load_weights(path, f"init_from '{path}'")  # weights_only always; names missing / unsafe / unreadable
    _check_keys(module, state, f"init_from '{path}'")
    module.load_state_dict(state, strict=False)
