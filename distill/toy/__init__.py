"""The toy world: a procedural image world (world.py), tiny CLIP / DINO / SAM teachers trained with their
own objectives (train_clip.py, train_dino.py, train_sam.py), a skill report (skills.py) and the cache
that builds them once (cache.py). Build with `python -m distill.toy build`, report with `python -m distill.toy report`.
"""
