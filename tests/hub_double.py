"""A double of `huggingface_hub.snapshot_download` for tests without internet (this machine reaches no hub).

It copies the behaviour our code depends on (huggingface_hub 2.4.0, huggingface_hub/_snapshot_download.py):
- the snapshot lives at `<cache_dir or HF_HUB_CACHE>/models--<org>--<name>/snapshots/<commit>/` (l. 429
  `snapshot_folder = os.path.join(storage_folder, "snapshots", commit_hash)`, folder name from file_download.py
  l. 754) and that path is returned (l. 559 `return snapshot_folder`);
- with `local_files_only=True` a cached snapshot is returned without a download (l. 346-359) and a missing one
  raises `LocalEntryNotFoundError` (l. 382-400).
A "download" copies the files of `source` (a real local model directory) after `delay_s` seconds and appends one
line to `calls_log`, so a test can count downloads across processes.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_snapshot_download(source: Path, calls_log: Path, delay_s: float = 0.0):
    """A snapshot_download double that serves every repo id from the model directory `source`."""

    def snapshot_download(repo_id: str, *, cache_dir=None, local_files_only: bool = False, ignore_patterns=None,
                          **_ignored) -> str:
        from huggingface_hub import constants
        from huggingface_hub.errors import LocalEntryNotFoundError

        repo_folder = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
        folder = repo_folder / "snapshots" / COMMIT
        with open(calls_log, "a") as log:
            log.write(f"{'cache' if local_files_only else 'download'} {repo_id} {ignore_patterns}\n")
        if local_files_only:
            if not folder.is_dir():
                raise LocalEntryNotFoundError(f"Cannot find an appropriate cached snapshot folder for {repo_id}")
            return str(folder)
        time.sleep(delay_s)
        tmp = folder.with_name(COMMIT + ".partial")
        shutil.copytree(source, tmp)
        tmp.rename(folder)
        return str(folder)

    return snapshot_download
