"""Index arrays cached as `.npy` files beside a description, named as megatron-core names them:
`{md5(description)}-{ClassName}[-{split}]-{name}.npy` and `...-description.txt`.

Every file is written under a temporary name and renamed into place, the description last, so a
reader never sees half a file and a crash mid-write leaves a clean miss. Two writers of the same
cache (say, one rank per node on a shared directory) write identical bytes, so the rename race is
harmless.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile

import numpy as np

from megatron_lite.errors import DataError


def describe(identifiers: dict) -> tuple[str, str]:
    """(description text, md5 hex digest): what the cache file names are keyed on."""
    text = json.dumps(identifiers, indent=4)
    return text, hashlib.md5(text.encode("utf-8")).hexdigest()


class IndexCache:
    """The cache files of one dataset: `base` is `{hash}-{ClassName}[-{split}]`."""

    def __init__(self, cache_dir: str | None, base: str, names: list[str]) -> None:
        self.cache_dir, self.base, self.names = cache_dir, base, names

    def path(self, name: str) -> str:
        assert self.cache_dir is not None
        return os.path.join(self.cache_dir, f"{self.base}-{name}")

    @property
    def description_path(self) -> str:
        return self.path("description.txt")

    def hit(self) -> bool:
        if self.cache_dir is None:
            return False
        files = [self.description_path] + [self.path(f"{n}.npy") for n in self.names]
        return all(os.path.isfile(f) for f in files)

    def load(self) -> list[np.ndarray]:
        """The cached arrays (memory-mapped); a DataError naming a file that numpy cannot read."""
        arrays = []
        for n in self.names:
            path = self.path(f"{n}.npy")
            try:
                arrays.append(np.load(path, mmap_mode="r"))
            except (ValueError, OSError, EOFError) as e:
                raise DataError(
                    f"index cache file {path} is truncated or corrupt ({e}); delete it (or its "
                    f"directory {self.cache_dir}) and rerun to rebuild it"
                ) from None
        return arrays

    def save(self, description: str, arrays: list[np.ndarray]) -> None:
        if self.cache_dir is None:
            return
        os.makedirs(self.cache_dir, exist_ok=True)
        for name, array in zip(self.names, arrays):
            _atomic_write(self.path(f"{name}.npy"), lambda f, a=array: np.save(f, a))
        _atomic_write(self.description_path, lambda f: f.write(description.encode("utf-8")))


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(path) or "."
    prefix = f".{os.path.basename(path)}.{socket.gethostname()}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
