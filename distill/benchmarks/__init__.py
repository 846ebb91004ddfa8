"""In-training encoder benchmarks (issue 12 item 6): frozen-feature probes of the student vs its teachers.

    callback.py  EncoderBenchmarks, the Lightning callback (trainer.callbacks in a distill YAML)
    sets.py      the probe images: toy-world labels and masks, or a labelled image folder
The scoring functions themselves are plain torch in distill/encoders/probes.py (shared with `unitower toy report`).
"""

from distill.benchmarks.callback import EncoderBenchmarks

__all__ = ["EncoderBenchmarks"]
