"""How the kubelet writes a Secret / projected volume, for rotation tests.

The kubelet's AtomicWriter (pkg/volume/util/atomic_writer.go) never rewrites a
file in place.  Each update:

1. writes every file into a fresh hidden directory ``..<timestamp>``;
2. makes a symlink ``..data_tmp -> ..<timestamp>`` and ``rename()``s it over
   ``..data`` (one atomic step: readers see the old set or the new set);
3. creates, once, the user-visible names as symlinks ``name -> ..data/name``;
4. removes the previous ``..<timestamp>`` directory.

So ``tls.crt`` keeps its name and its own symlink forever; only what it
resolves to changes.  :func:`write` does exactly that.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

__all__ = ["write"]


def write(volume: Path, files: dict[str, bytes]) -> Path:
    """Publish ``files`` in ``volume`` as the kubelet does; return the new data directory."""
    volume.mkdir(parents=True, exist_ok=True)
    data_link = volume / "..data"
    old = Path(os.readlink(data_link)) if data_link.is_symlink() else None
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.") + f"{time.monotonic_ns() % 10**9:09d}"
    new_dir = volume / stamp
    new_dir.mkdir(mode=0o755)
    for name, content in files.items():
        (new_dir / name).write_bytes(content)
        os.chmod(new_dir / name, 0o644)
    tmp = volume / "..data_tmp"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(stamp, tmp)
    os.rename(tmp, data_link)  # the atomic swap
    for name in files:
        visible = volume / name
        if not visible.is_symlink():
            os.symlink(Path("..data") / name, visible)
    if old is not None and old.name != stamp:
        shutil.rmtree(volume / old, ignore_errors=True)
    return new_dir
