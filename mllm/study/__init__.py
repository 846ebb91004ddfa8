"""The baseline study: single encoders vs ensembles vs the distilled student (scripts/compare_baselines.py)."""
