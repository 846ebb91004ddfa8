"""The common layer: what every other part of unitower imports, and which imports nothing of the project but itself.

Atomic writers and the one safe weight loader (`io`, `checkpoint_io`), the one warmup + cosine schedule (`schedule`),
the name resolver (`names`), state-dict key checks (`state_dicts`), the per-machine precision choice (`precision`),
the one image / tar decode path and skip policy (`decode`, `skips`) and step timing (`timing`).
`tests/test_import_direction.py` enforces that nothing here imports a higher layer.
"""
