"""Shared by the fault and integrity tests: a tiny audio stage (per 10 ms frame [mean, std, peak])
and a process that holds a lock, as another imer command would."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import soundfile as sf

from extract import base


class RmsStage(base.Extractor):
    """Test-only audio stage; subclasses set ``name`` (and register it). ``masked``: the silent
    frames are invalid."""

    modality = "audio"
    batch_size = 2
    masked = False

    @property
    def dim(self):
        return 3

    @property
    def frame_rate(self):
        return 100.0

    def load(self):
        pass

    def extract_one(self, utt):
        y, _ = sf.read(utt.audio.path, dtype="float32")
        fr = y[: len(y) // 160 * 160].reshape(-1, 160)
        feats = np.stack([fr.mean(1), fr.std(1), np.abs(fr).max(1)], 1).astype(np.float32)
        return base.Output(feats, fr.std(1) > 1e-4 if self.masked else None)


@contextmanager
def lock_held_elsewhere(path):
    """A separate process holding ``pipeline.fsutil.process_lock(path)``; yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pipeline.fsutil import process_lock\n"
        f"with process_lock({str(path)!r}):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
