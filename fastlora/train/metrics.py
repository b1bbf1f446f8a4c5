"""The metrics log of a run: ``metrics.jsonl`` (one JSON object a line, each with its ``step``) and, when
TensorBoard is installed, the same numbers as scalars under ``tensorboard/``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

from fastlora.train.durable import fsync_path

_log = logging.getLogger("fastlora")


class MetricsLog:
    """Appends records to ``output_dir/metrics.jsonl``. Only the main rank (``main``) writes; elsewhere
    every method does nothing, so callers need not ask which rank they are on."""

    def __init__(self, output_dir: str, *, main: bool) -> None:
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.main = main
        self.tb = None
        if main:
            with contextlib.suppress(ImportError):  # TensorBoard is optional
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (it holds ``step``); its numbers also go to TensorBoard at that step."""
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def reset(self) -> None:
        """A fresh run: drop the log of an earlier run in the same directory."""
        if self.main and os.path.exists(self.path):
            os.remove(self.path)

    def trim(self, step: int) -> None:
        """On resume, drop what the interrupted run logged after its last checkpoint at ``step`` (atomic
        rewrite), so the log reads as if the run had never stopped."""
        if not self.main or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    after = record.get("step", 0) > step
                except (ValueError, AttributeError, TypeError):
                    # a run killed while appending leaves a torn last line; what it held is logged again
                    _log.warning("fastlora: %s:%d: skipped a torn line (the run stopped while writing it): %.60r",
                                 self.path, number, line)  # fmt: skip
                    continue
                if not after:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_path(os.path.dirname(os.path.abspath(self.path)))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
