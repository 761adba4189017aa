"""What a user watches during ``sflam simulate``: the rounds as they finish.

The server appends one JSON line per round to metrics.jsonl; :func:`read_new_records` follows
the file (only complete lines) and :class:`Progress` shows a bar rewritten in place on a
terminal, or one line per round otherwise (a log file, CI).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server_runtime.round_record import RoundRecord


class Progress:
    """A bar rewritten in place on a terminal; one line per round otherwise."""

    def __init__(self, total: int, turns: int, stream: Any = None) -> None:
        self.total, self.turns = total, turns
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.shown = 0

    def update(self, records: Sequence[RoundRecord]) -> None:
        counted = [r for r in records if r.counted]
        done = len(counted) // self.turns
        if done == self.shown:
            return
        self.shown = done
        accuracy = next((r.accuracy for r in reversed(counted) if r.accuracy is not None), None)
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        width = 30
        filled = int(width * done / self.total)
        acc = f"acc {accuracy:6.2%}" if accuracy is not None else "acc   -   "
        text = (f"round {done:>3}/{self.total} [{'#' * filled}{'.' * (width - filled)}] {acc}  "
                f"{elapsed:6.1f} s  eta {eta:5.0f} s")
        if self.tty:
            self.stream.write("\r" + text)
            if done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and 0 < self.shown < self.total:
            self.stream.write("\n")
            self.stream.flush()


def read_new_records(path: Path, offset: int) -> tuple[list[RoundRecord], int]:
    """The round records in complete lines appended to ``path`` since ``offset``; (records, new
    offset). Other events are skipped; a round line the type does not describe raises."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    records = []
    for line in data[:end].splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("event") == "round":
                records.append(RoundRecord.from_dict(record))
    return records, offset + end + 1
