"""``large_files.yml`` for a trained model, as the MONAI Model Zoo brings weights into a bundle.

A zoo bundle does not carry its weights in git: ``large_files.yml`` lists each large file with the URL it
is downloaded from and its hash, and the zoo's tools (``ci/verify_bundle.py``, ``monai.bundle download``)
fetch them into the bundle. This bundle's weights are two files that only work together:
``models/model.pt`` (the state dict) and ``models/model_config.json`` (which networks, patch size,
classes, intensity normalisation and orientation rebuild them; inference refuses weights without it).
So both are listed, with their MD5 hashes:

    python -m scripts.publishing.large_files --url https://example.org/my_cct_r_v1 [--models_dir models] [--out large_files.yml]

writes ``large_files.yml`` (``path``, ``url``, ``hash_val``, ``hash_type``: the zoo's fields) naming
``<url>/model.pt`` and ``<url>/model_config.json``; upload the two files there. A missing or empty file
is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from scripts.data.atomic_io import write_text
from scripts.user_errors import BundleInputError

__all__ = ["MODEL_FILES", "large_files", "md5"]

#: the files of a trained model, relative to the bundle root
MODEL_FILES = ("models/model.pt", "models/model_config.json")


def md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def large_files(url: str, models_dir: str | os.PathLike = "models", out: str | os.PathLike = "large_files.yml") -> Path:
    """Write ``out`` listing the model's files under ``url`` with their MD5 hashes; returns its path."""
    if not str(url).strip():
        raise BundleInputError("--url: give the address the model files will be uploaded to")
    rows = []
    for rel in MODEL_FILES:
        path = Path(models_dir) / Path(rel).name
        if not path.is_file() or path.stat().st_size == 0:
            raise BundleInputError(
                f"{path}: missing or empty; a model is published as {' and '.join(Path(f).name for f in MODEL_FILES)} "
                "together (train one first, or pass --models_dir)"
            )
        rows.append((rel, f"{str(url).rstrip('/')}/{path.name}", md5(path)))
    text = "large_files:\n" + "".join(
        f'  - path: "{rel}"\n    url: "{address}"\n    hash_val: "{digest}"\n    hash_type: "md5"\n'
        for rel, address, digest in rows
    )
    write_text(out, text)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    import fire

    def run(url: str, models_dir: str = "models", out: str = "large_files.yml") -> None:
        path = large_files(url, models_dir, out)
        print(
            f"{path}: upload {', '.join(str(Path(models_dir) / Path(f).name) for f in MODEL_FILES)} to {str(url).rstrip('/')}/"
        )

    fire.Fire(run, command=argv)


if __name__ == "__main__":
    main()
