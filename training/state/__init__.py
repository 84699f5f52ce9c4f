"""Run-directory persistence: the names of what a run writes (`layout`), writes that survive a kill
(`files`, `scratch`), checkpoints (`save`, `resume`, `tags`, `compat`, `rng`, `pickles`), their content
checks (`integrity`, `health`) and the locks on the output directory (`outputs`)."""
from .compat import check_compatible
from .files import atomic_copy, atomic_write_text, fsync_dir, make_dirs, remove_empty_dirs, same_file
from .health import check_finite, mark_healthy, nonfinite_tensors, read_healthy, set_aside
from .integrity import check_directory, file_crc32, has_manifest, verify, write_manifest
from .layout import (CHECKPOINTS, DIVERGED_SUFFIX, FINAL, HF_CONFIG, LATEST, MANIFEST, RUN_CONFIG, TOKENIZER, WEIGHTS,
                     ZERO0_MODEL_FILE, RunDir, rank_state_name)
from .outputs import FileLock, RunDirLock, check_output_dir
from .resume import find_resume, load_checkpoint, problem
from .rng import rng_state, set_rng_state
from .pickles import broken_archives, check_pickles, safe_load
from .save import clean_stale, prune, save_checkpoint
from .scratch import remove_dir, replace_dir, trash_of
from .tags import follow_latest, read_latest, step_dirs

__all__ = ["CHECKPOINTS", "DIVERGED_SUFFIX", "FINAL", "FileLock", "HF_CONFIG", "LATEST", "MANIFEST", "RUN_CONFIG",
           "RunDir", "RunDirLock", "TOKENIZER", "WEIGHTS", "ZERO0_MODEL_FILE", "atomic_copy", "atomic_write_text",
           "broken_archives", "check_compatible", "check_directory", "check_finite", "check_output_dir",
           "check_pickles", "clean_stale", "file_crc32", "find_resume", "follow_latest", "fsync_dir", "has_manifest",
           "load_checkpoint", "make_dirs", "mark_healthy", "nonfinite_tensors", "problem", "prune", "rank_state_name",
           "read_healthy", "read_latest", "remove_dir", "remove_empty_dirs", "replace_dir", "rng_state", "safe_load",
           "same_file", "save_checkpoint", "set_aside", "set_rng_state", "step_dirs", "trash_of", "verify",
           "write_manifest"]
