"""The split guard of train.py: a warning when SDM's foreground split collapses.

A DiSa run can lose what SDM is meant to add while its loss looks normal. Of three DiSa training seeds on one toy
world, the one that collapsed (23 mIoU against 33 and 40) had 36 % of its foreground tokens on their own class,
against 56 % and 86 %; in all three, about 30 % of the present classes got no foreground token at all. The guard
reads the split statistics (`modeling_disa.evaluation.split_statistics`) of every logging window and of every
evaluation from the end of the warm-up on, and warns when one falls below its recipe threshold (0 turns a check off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GuardedStatistic:
    name: str  # key of SplitStatistics.compute()
    setting: str  # recipe field holding its threshold
    meaning: str  # what a low value means, for the warning


GUARDED = (
    GuardedStatistic(
        "present_with_foreground",
        "split_guard_min_present_with_foreground",
        "share of present classes that get any foreground token; the others go wholly through the background "
        "branch, so SDM no longer separates them from the background",
    ),
    GuardedStatistic(
        "foreground_precision",
        "split_guard_min_foreground_precision",
        "share of foreground tokens that lie on their own class; low: the split no longer follows the classes "
        "(on one toy world, the DiSa run that collapsed had 0.36, the others 0.56 and 0.86)",
    ),
)


class SplitGuard:
    """Counts and describes the statistics below their thresholds from `warmup_steps` on.

    Args:
        thresholds: `{statistic name: minimum}` for every statistic of `GUARDED`.
        warmup_steps: optimiser steps before the first check (the split is still forming).
        warnings / last_warning: the state of a resumed run (its checkpoint's).
    """

    def __init__(self, thresholds: dict[str, float], warmup_steps: int, warnings: int = 0, last_warning=None):
        missing = sorted({g.name for g in GUARDED} - set(thresholds))
        if missing:
            raise ValueError(f"no threshold for {missing}")
        self.thresholds = dict(thresholds)
        self.warmup_steps = int(warmup_steps)
        self.warnings = int(warnings)
        self.last_warning = last_warning

    @classmethod
    def from_recipe(cls, recipe, max_train_steps: int, **state) -> SplitGuard:
        warmup = math.ceil(recipe.split_guard_warmup_fraction * max_train_steps)
        return cls({g.name: getattr(recipe, g.setting) for g in GUARDED}, warmup, **state)

    def check(self, statistics: dict, step: int, source: str) -> list[str]:
        """The warnings for `statistics` (`SplitStatistics.compute()` of `source`, e.g. "training window") at
        optimiser step `step`; counted in `warnings`, the last one kept in `last_warning`."""
        if step < self.warmup_steps:
            return []
        messages = []
        for guarded in GUARDED:
            value, threshold = statistics.get(guarded.name), self.thresholds[guarded.name]
            if value is None or value >= threshold:  # None: nothing to measure (no present class, no token)
                continue
            messages.append(
                f"SDM split collapsing? step {step}, {source}: {guarded.name} = {value:.3f} is below "
                f"{guarded.setting} = {threshold} ({guarded.meaning})."
            )
            self.warnings += 1
            self.last_warning = {
                "step": step,
                "source": source,
                "statistic": guarded.name,
                "value": value,
                "threshold": threshold,
            }
        return messages

    def summary(self) -> dict:
        return {
            "split_guard_warnings": self.warnings,
            "split_guard_last_warning": self.last_warning,
            "split_guard_thresholds": dict(self.thresholds),
            "split_guard_warmup_steps": self.warmup_steps,
        }
