"""Counting what the data loaders skipped: the `Skipped` marker, `SkipTally` and `DataSkips`.

    marker = Skipped("shard.tar :: 000012.jpg", "shard.tar", "undecodable image", "OSError: ...")
    tally = SkipTally("train", max_skipped_fraction=0.5)
    tally.add([marker], used=31)            # warns, counts by reason and by file, checks the ceiling
    print(tally.summary())                  # [train] 31 items used, 1 skipped: {...}; worst files: ...

Loaders (`distill.common.decode`, the sources of both packages) never raise or drop silently: they return markers,
datasets pass them through to the batch, and the DataModule counts them in the main process
(`on_before_batch_transfer`), so counts are exact whatever the number of DataLoader workers. A tally warns
(the first 20 markers in full, then at every power of ten), stops a run once more than `max_skipped_fraction`
of at least MIN_ITEMS_FOR_CEILING items was skipped (naming the worst files), and gives the final summary.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MIN_ITEMS_FOR_CEILING = 100  # the skip ceiling is checked only once this many items were seen
FULL_WARNINGS = 20  # markers warned about one by one; later ones at every power of ten


@dataclass(frozen=True)
class Skipped:
    """An item that was not used: `where` names the file or 'shard :: member', `file` the file or shard (for
    the worst-files ranking), `reason` a short kind ('undecodable image', ...) and `detail` the specifics."""

    where: str
    file: str
    reason: str
    detail: str = ""

    @property
    def message(self) -> str:
        return f"skipping {self.where}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


class DataQualityError(RuntimeError):
    """Raised when more than `max_skipped_fraction` of the data was skipped."""



class SkipTally:
    """Exact counts of used and skipped items in one process (the main process: markers arrive with batches).

    Args:
        name: shown in warnings and the summary ('train', 'val').
        max_skipped_fraction: `check()` raises DataQualityError once more than this fraction of the items
            seen (at least MIN_ITEMS_FOR_CEILING) was skipped; 1.0 never stops.
    """

    def __init__(self, name: str = "data", max_skipped_fraction: float = 1.0) -> None:
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise ValueError(f"max_skipped_fraction={max_skipped_fraction} must be in [0, 1] (1 disables the ceiling).")
        self.name, self.max_skipped_fraction = name, max_skipped_fraction
        self.used = 0
        self.by_reason: Counter = Counter()
        self.by_file: Counter = Counter()

    @property
    def skipped(self) -> int:
        return sum(self.by_reason.values())

    def add(self, markers: Iterable[Skipped], used: int = 0, quiet: bool = False) -> None:
        """Count `used` good items and each marker (warned about unless `quiet`), then `check()`."""
        self.used += used
        for marker in markers:
            self.by_reason[marker.reason] += 1
            self.by_file[marker.file] += 1
            total = self.skipped
            if not quiet and (total <= FULL_WARNINGS or _power_of_ten(total)):
                more = "" if total <= FULL_WARNINGS else " (warnings now only at every power of ten)"
                warnings.warn(f"[{self.name}] {marker.message}; {total} skipped so far{more}", stacklevel=2)
        self.check()

    def check(self) -> None:
        """Raise DataQualityError if the skipped fraction exceeds the ceiling."""
        seen = self.used + self.skipped
        if seen < MIN_ITEMS_FOR_CEILING or self.skipped <= self.max_skipped_fraction * seen:
            return
        worst = ", ".join(f"{f} ({n})" for f, n in self.by_file.most_common(5))
        raise DataQualityError(
            f"[{self.name}] {self.skipped} of {seen} items skipped ({self.skipped / seen:.0%}), more than "
            f"max_skipped_fraction={self.max_skipped_fraction}. Worst files: {worst}. Reasons: {dict(self.by_reason)}. "
            "Repair or remove these files, or raise max_skipped_fraction."
        )

    def summary(self) -> str:
        """One line: used, skipped by reason, worst files."""
        if not self.skipped:
            return f"[{self.name}] {self.used} items used, none skipped."
        worst = ", ".join(f"{f} ({n})" for f, n in self.by_file.most_common(3))
        return (f"[{self.name}] {self.used} items used, {self.skipped} skipped: {dict(self.by_reason)}; "
                f"worst files: {worst}")


def _power_of_ten(n: int) -> bool:
    return n >= 10 and str(n).rstrip("0") == "1"


class DataSkips:
    """The train and val SkipTally of a DataModule, fed from `on_before_batch_transfer` (main process).

    `record_load(stage, kept, markers)` counts items dropped before training (e.g. bad JSON records; the
    ceiling is checked against the `kept` ones); `record(trainer, markers, used)` counts a batch's markers in
    the tally of the running stage and logs the running total `train/skipped` (`val/skipped`: load drops
    included) to the trainer's loggers whenever it changes; `summary()` is printed at the end of fit.
    Duck-typed on the Lightning Trainer so this module stays Lightning-free.
    """

    def __init__(self, max_skipped_fraction: float = 1.0) -> None:
        self.train = SkipTally("train", max_skipped_fraction)
        self.val = SkipTally("val", max_skipped_fraction)
        self.loaded = {"train": SkipTally("train at load", max_skipped_fraction),
                       "val": SkipTally("val at load", max_skipped_fraction)}

    def record_load(self, stage: str, kept: int, markers: list[Skipped]) -> None:
        self.loaded[stage].add(markers, kept, quiet=True)  # the loader has warned about them already

    def total(self, stage: str) -> int:
        """Skipped items of `stage` ('train' / 'val') so far, load drops included."""
        return getattr(self, stage).skipped + self.loaded[stage].skipped

    def record(self, trainer: Any, markers: list[Skipped], used: int) -> None:
        tally = self.train if trainer is None or getattr(trainer, "training", True) else self.val
        before, first = tally.skipped, tally.used == 0 and tally.skipped == 0
        try:
            tally.add(markers, used)
        finally:  # log the total even when the ceiling stops the run
            if trainer is not None and (first or tally.skipped != before):
                for logger in getattr(trainer, "loggers", []):
                    logger.log_metrics({f"{tally.name}/skipped": float(self.total(tally.name))}, step=trainer.global_step)

    def summary(self) -> str:
        tallies = (self.loaded["train"], self.train, self.loaded["val"], self.val)
        return "data summary: " + " ".join(t.summary() for t in tallies if t.used or t.skipped)
