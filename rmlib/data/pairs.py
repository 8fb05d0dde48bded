"""Row validation shared by all pairwise loaders, and the Collector that counts drops."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from contextlib import contextmanager

from .drop_report import DropReport, Loaded, log_summary
from .errors import Drop
from .schema import PAIR_FEATURES, ROLES, pair_row, to_dataset
from .transcript import split_last_reply, split_transcript_pair

MISSING = object()  # "the row has no such field" (as opposed to a null value)


def check_encodable(value: str, field: str) -> str:
    """The string itself, or Drop("invalid unicode <field>") for text that has no UTF-8 form
    (a lone surrogate such as "\\ud800" in the JSON): Arrow could not store it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Drop(f"invalid unicode {field}") from None
    return value


def check_text(value, field: str) -> str:
    """A non-empty string, else Drop("missing/non-string/empty/invalid unicode <field>")."""
    if value is None or value is MISSING:
        raise Drop(f"missing {field}")
    if not isinstance(value, str):
        raise Drop(f"non-string {field}")
    if not value.strip():
        raise Drop(f"empty {field}")
    return check_encodable(value, field)


def check_messages(value, field: str = "prompt", check_empty: bool = True) -> list[dict]:
    """Chat messages from a string (one user turn) or a list of {"role", "content"}."""
    if isinstance(value, str) or value is None or value is MISSING:
        return [{"role": "user", "content": check_text(value, field)}]
    if not isinstance(value, (list, tuple)):
        raise Drop(f"non-string {field}")
    if not value:
        raise Drop(f"empty {field}")
    out = []
    for m in value:
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise Drop(f"bad {field} message")
        content = m.get("content")
        if not isinstance(content, str):
            raise Drop(f"{'missing' if content is None else 'non-string'} {field} message")
        if check_empty and not content.strip():
            raise Drop(f"empty {field} message")
        out.append({"role": m["role"], "content": check_encodable(content, f"{field} message")})
    return out


def check_score(value, field: str) -> float:
    """A finite float (NaN when unknown), else Drop("unparsable/non-finite score")."""
    if value is None or value is MISSING:
        return math.nan
    if isinstance(value, bool):
        raise Drop("unparsable score")
    try:
        x = float(value.strip() if isinstance(value, str) else value)
    except OverflowError:  # an integer beyond the float range
        raise Drop("non-finite score") from None
    except (TypeError, ValueError):
        raise Drop("unparsable score") from None
    if not math.isfinite(x):
        raise Drop("non-finite score")
    return x


def check_label(value, field: str) -> float:
    """A judgment/label as a float from int, float or numeric string (None -> Drop missing)."""
    if value is None or value is MISSING:
        raise Drop(f"missing {field}")
    if isinstance(value, bool):
        raise Drop(f"unparsable {field}")
    try:
        x = float(value.strip() if isinstance(value, str) else value)
    except OverflowError:  # an integer beyond the float range
        raise Drop(f"non-finite {field}") from None
    except (TypeError, ValueError):
        raise Drop(f"unparsable {field}") from None
    if not math.isfinite(x):
        raise Drop(f"non-finite {field}")
    return x


def opt_text(value, field: str) -> str:
    """An optional string field: None/missing -> "", non-string -> Drop."""
    if value is None or value is MISSING:
        return ""
    if not isinstance(value, str):
        raise Drop(f"non-string {field}")
    return check_encodable(value, field)


def _completion(value, prompt: list[dict], field: str) -> str:
    """A reply given as a string, a one-message list, or the whole conversation."""
    if isinstance(value, (list, tuple)):
        msgs = check_messages(value, field, check_empty=False)
        head, reply = split_last_reply(msgs)
        if head and head != prompt:
            raise Drop("prefix differs")
        return check_text(reply, field)
    return check_text(value, field)


def normalize_pair(prompt, chosen, rejected) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen reply, rejected reply) from any supported layout.

    Layouts: explicit prompt (string or messages) with string or message-list replies; no
    prompt with two HH transcripts; no prompt with two full message lists (Skywork style).
    """
    if prompt is MISSING:
        if isinstance(chosen, (list, tuple)) and isinstance(rejected, (list, tuple)):
            p_c, c = split_last_reply(check_messages(chosen, "chosen", check_empty=False))
            p_r, r = split_last_reply(check_messages(rejected, "rejected", check_empty=False))
            if p_c != p_r:
                raise Drop("prefix differs")
            msgs = p_c
        else:
            check_text(chosen, "chosen"), check_text(rejected, "rejected")
            msgs, c, r = split_transcript_pair(chosen, rejected)
        if not msgs:
            raise Drop("empty prompt")
        for m in msgs:
            check_text(m["content"], "prompt message")
    else:
        msgs = check_messages(prompt, "prompt")
        c, r = _completion(chosen, msgs, "chosen"), _completion(rejected, msgs, "rejected")
    c, r = check_text(c, "chosen"), check_text(r, "rejected")
    if c.strip() == r.strip():
        raise Drop("identical chosen/rejected")
    return msgs, c, r


class Collector:
    """Accumulates valid schema rows and counts every dropped row with its reason."""

    def __init__(self, name: str, source: str, features=PAIR_FEATURES):
        self.name, self.source, self.features = name, source, features
        self.rows: list[dict] = []
        self.drops = DropReport(source)

    @contextmanager
    def row(self, row_id: str):
        """Run one row's conversion; a Drop raised inside is counted, not propagated."""
        try:
            yield
        except Drop as d:
            self.drops.add(d.reason, row_id)

    def pair(self, row_id: str, prompt=MISSING, chosen=MISSING, rejected=MISSING, *,
             source: str | None = None, category=None, chosen_generator=None,
             rejected_generator=None, chosen_score=None, rejected_score=None) -> bool:
        """Validate and add one pair; return False (and count the drop) if it is odd."""
        with self.row(row_id):
            msgs, c, r = normalize_pair(prompt, chosen, rejected)
            cs, rs = check_score(chosen_score, "chosen_score"), check_score(rejected_score, "rejected_score")
            if cs == rs:
                raise Drop("tie")
            row = pair_row(
                id=row_id, prompt=msgs, chosen=c, rejected=r, source=source or self.source,
                category=opt_text(category, "category"),
                chosen_generator=opt_text(chosen_generator, "chosen_generator"),
                rejected_generator=opt_text(rejected_generator, "rejected_generator"),
                chosen_score=cs, rejected_score=rs)
            if cs < rs:
                self.drops.note("chosen score below rejected", row_id)
            self.rows.append(row)
            return True
        return False

    def finish(self, logger: logging.Logger) -> Loaded:
        """Build the dataset, log one summary line, return Loaded."""
        ds = to_dataset(self.rows, self.features)
        log_summary(logger, self.name, len(ds), self.drops)
        return Loaded(ds, self.drops)
