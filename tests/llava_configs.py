"""Config pieces the LLaVA CLI tests share (imported by test modules: tests/ is on sys.path under pytest)."""


def cli_trainer(run_dir, max_steps: int, filename: str) -> dict:
    """A quiet CPU trainer section writing `<run_dir>/<filename>.ckpt`."""
    return {"max_steps": max_steps, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
            "default_root_dir": str(run_dir), "num_sanity_val_steps": 0,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(run_dir), "filename": filename}}]}


def timm_tower(vit_dir, grid: int = 2) -> dict:
    """A SingleEncoderTower over a timm local-dir ViT."""
    return {"class_path": "mllm.towers.SingleEncoderTower", "init_args": {"grid": grid, "encoder": {
        "class_path": "distill.encoders.TimmEncoder", "init_args": {"model_name": f"local-dir:{vit_dir}", "pretrained": True}}}}
