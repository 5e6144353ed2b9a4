"""Downloads of a run: its PEFT adapter as a zip, with the run's settings and a README on loading it."""
from __future__ import annotations

import json
import os
import secrets
import zipfile
from pathlib import Path

from . import runs as runs_mod
from .jobqueue import JobError


def zip_adapter(run: runs_mod.Run, dest_dir: str | Path) -> Path:
    """A zip of the run's PEFT adapter (load it with PeftModel.from_pretrained after unzipping)."""
    if run.adapter is None:
        raise JobError(f"{run.name} is the base model itself; it has no adapter to download")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    folder = runs_mod.export_name(run)
    target = dest_dir / f"{folder}.zip"
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(3)}")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(run.adapter.iterdir()):
            if file.is_file():
                archive.write(file, f"{folder}/{file.name}")
        archive.writestr(f"{folder}/safespace_run.json",
                         json.dumps({"config": run.config, "summary": run.summary}, indent=2, default=str))
        archive.writestr(f"{folder}/README.md", runs_mod.export_readme(run))   # how to load it, as in the app
    os.replace(tmp, target)
    return target
