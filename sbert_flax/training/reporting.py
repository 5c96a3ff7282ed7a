"""Run outputs on process 0: the log, `metrics.jsonl`, TensorBoard events, and the tqdm bar."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("sbert_flax.train")


def setup_logging(output_dir: str, is_main: bool) -> None:
    """INFO to stderr and `output_dir/train.log` on process 0; warnings only elsewhere."""
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if is_main:
        fh = logging.FileHandler(os.path.join(output_dir, "train.log"), encoding="utf-8")
        fh.setFormatter(fmt)
        log.addHandler(fh)


class MetricsWriter:
    """Appends JSON lines to `metrics.jsonl` and scalars to TensorBoard (`tb/`); no-op off main."""

    def __init__(self, output_dir: str, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            path = os.path.join(output_dir, "metrics.jsonl")
            if resume_step is not None:
                drop_records_after(path, resume_step)
            elif os.path.exists(path):  # a fresh run in a reused directory starts a fresh file
                os.remove(path)
            self._jsonl = open(path, "a", encoding="utf-8")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(output_dir, "tb"))
            except ImportError:  # TensorBoard is optional; the JSONL has everything
                log.warning("tensorboardX is not installed: no TensorBoard events")

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": time.time(), **values}
        self._jsonl.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def drop_records_after(path: str, step: int) -> int:
    """Removes the records of steps after `step` (written after the checkpoint a run resumes
    from, and about to be written again), so metrics.jsonl never repeats a step. Returns how many
    were dropped."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                dropped += 1
                continue
            if int(rec.get("step", 0)) > step:
                dropped += 1
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return dropped


def progress(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar over the steps of an epoch (a do-nothing stand-in when disabled)."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
