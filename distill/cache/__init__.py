"""Teacher-feature cache: run the teachers once (`python -m distill cache`), train from their compressed
outputs (`data.teacher_cache`). writer.py writes, dataset.py reads, codec.py / layout.py compress,
views.py holds the crops shared with the training augmentation, measure.py reports bytes and cosines."""
