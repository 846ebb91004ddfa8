"""Image data for distillation: sources (toy world, image folders, webdataset shards) and the DataModule."""

from distill.data.datamodule import DistillDataModule
from distill.data.sources import ImageFolder, ImageSource, ShardImages, ToyImages

__all__ = ["DistillDataModule", "ImageFolder", "ImageSource", "ShardImages", "ToyImages"]
