"""DropReport: what a loader dropped and why (counts per reason, a few example ids)."""

from __future__ import annotations

import logging
from collections import Counter
from typing import NamedTuple

import pandas as pd
from datasets import Dataset


class DropReport:
    """Counts of dropped rows per (source, reason), with up to ``max_examples`` ids each.

    ``kept`` holds informational counters for odd rows that were kept on purpose
    (e.g. AlpacaEval ties); they are not drops and do not count in ``total``.
    """

    def __init__(self, source: str = "", max_examples: int = 3):
        self.source = source
        self.max_examples = max_examples
        self._counts: Counter = Counter()  # (source, reason) -> n
        self._examples: dict[tuple[str, str], list[str]] = {}
        self.kept: Counter = Counter()
        self.kept_examples: dict[str, list[str]] = {}

    def add(self, reason: str, row_id: str | None = None, n: int = 1, source: str | None = None):
        """Count ``n`` dropped rows under ``reason`` (for ``source``, default this report's)."""
        key = (self.source if source is None else source, reason)
        self._counts[key] += n
        ex = self._examples.setdefault(key, [])
        if row_id is not None and len(ex) < self.max_examples:
            ex.append(str(row_id))

    def note(self, what: str, row_id: str | None = None, n: int = 1):
        """Count ``n`` odd rows that were kept (informational, not a drop)."""
        self.kept[what] += n
        ex = self.kept_examples.setdefault(what, [])
        if row_id is not None and len(ex) < self.max_examples:
            ex.append(str(row_id))

    @property
    def counts(self) -> Counter:
        """Dropped rows per reason, summed over sources."""
        out: Counter = Counter()
        for (_, reason), n in self._counts.items():
            out[reason] += n
        return out

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    def __len__(self) -> int:
        return len(self._counts)

    def examples(self, reason: str) -> list[str]:
        return [i for (_, r), ids in self._examples.items() if r == reason for i in ids]

    def merge(self, other: "DropReport") -> "DropReport":
        """A new report holding both reports' counts (sources kept apart)."""
        out = DropReport(self.source if self.source == other.source else "",
                         max(self.max_examples, other.max_examples))
        for rep in (self, other):
            for (src, reason), n in rep._counts.items():
                out._counts[(src, reason)] += n
                ex = out._examples.setdefault((src, reason), [])
                ex.extend(rep._examples.get((src, reason), [])[: out.max_examples - len(ex)])
            for what, n in rep.kept.items():
                out.kept[what] += n
                ex = out.kept_examples.setdefault(what, [])
                ex.extend(rep.kept_examples.get(what, [])[: out.max_examples - len(ex)])
        return out

    def as_frame(self) -> pd.DataFrame:
        """One row per (source, reason): columns source, reason, count, examples (list of ids)."""
        rows = [{"source": s, "reason": r, "count": n, "examples": list(self._examples.get((s, r), []))}
                for (s, r), n in sorted(self._counts.items())]
        return pd.DataFrame(rows, columns=["source", "reason", "count", "examples"])

    def summary(self) -> str:
        """One line: total and counts per reason."""
        parts = ", ".join(f"{r}: {n}" for r, n in sorted(self.counts.items()))
        line = f"dropped {self.total}" + (f" ({parts})" if parts else "")
        if self.kept:
            line += "; kept odd rows: " + ", ".join(f"{w}: {n}" for w, n in sorted(self.kept.items()))
        return line

    def __str__(self) -> str:
        head = f"DropReport[{self.source}]" if self.source else "DropReport"
        lines = [f"{head}: {self.total} rows dropped"]
        for (s, r), n in sorted(self._counts.items()):
            ex = ", ".join(self._examples.get((s, r), []))
            lines.append(f"  {s + ': ' if s and s != self.source else ''}{r}: {n}" + (f"  e.g. {ex}" if ex else ""))
        for w, n in sorted(self.kept.items()):
            ex = ", ".join(self.kept_examples.get(w, []))
            lines.append(f"  kept ({w}): {n}" + (f"  e.g. {ex}" if ex else ""))
        return "\n".join(lines)

    __repr__ = __str__


class Loaded(NamedTuple):
    """What every loader returns: the dataset and what was dropped on the way."""

    dataset: Dataset
    drops: DropReport


def log_summary(logger: logging.Logger, name: str, n_kept: int, drops: DropReport) -> None:
    """Log (INFO) one line: rows kept and the drop summary."""
    logger.info("%s: kept %d rows; %s", name, n_kept, drops.summary())
