"""The names of every file and directory a run writes, in one place.

    <output_dir>/
      run_config.json        the resolved run config (runs before 2026-12 called it config.json: still read)
      tokenizer.model        the sentencepiece model the run tokenized with
      train_log.jsonl        one JSON record per logged step and per evaluation
      tensorboard/           TensorBoard events
      .lock                  held (flock) by the process that writes the run, while it runs (also in the
                             real directories of checkpoints/ and tensorboard/: training/state/outputs.py)
      checkpoints/step_N/    DeepSpeed's files + trainer_state_rank{r}.json + run_config.json + tokenizer.model
                             + manifest.json (every file's size and CRC-32, written last: training/state/integrity.py)
      checkpoints/latest     the tag of the newest complete checkpoint
      checkpoints/healthy    the tag of the newest checkpoint verified healthy (training/state/health.py)
      checkpoints/step_N.diverged/  a checkpoint set aside after the run diverged (kept, never resumed)
      final/                 model.safetensors, config.json (transformers'), tokenizer files, run_config.json,
                             manifest.json
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN_CONFIG = "run_config.json"
LEGACY_RUN_CONFIG = "config.json"   # the run directory's name for the run config until 2026-12 (read only)
HF_CONFIG = "config.json"           # transformers' LlamaConfig, in final/
TOKENIZER = "tokenizer.model"
WEIGHTS = "model.safetensors"
TRAIN_LOG = "train_log.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
HEALTHY = "healthy"
DIVERGED_SUFFIX = ".diverged"      # checkpoints/step_N.diverged/: set aside after a divergence
MANIFEST = "manifest.json"
FINAL = "final"
LOCK = ".lock"
ZERO0_MODEL_FILE = "mp_rank_00_model_states.pt"


def rank_state_name(rank: int) -> str:
    """The file holding rank `rank`'s trainer state (step, tokens, data position, RNG) in a checkpoint."""
    return f"trainer_state_rank{rank}.json"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run's output directory."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def run_config(self) -> Path:
        return self.root / RUN_CONFIG

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER

    @property
    def train_log(self) -> Path:
        return self.root / TRAIN_LOG

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    def saved_run_config(self) -> Path:
        """The run config file this directory holds (the legacy name when only that exists)."""
        legacy = self.root / LEGACY_RUN_CONFIG
        return legacy if not self.run_config.is_file() and legacy.is_file() else self.run_config
