"""A writer to crash: overwrites a model folder and a JSON file through `sbert_flax.common.files`, in a
loop or once, so a test can SIGKILL it at chosen or random moments and check what is left.

`sbert_flax/common/files.py` is loaded on its own, not through the package: `import sbert_flax` imports
JAX (about 2 s a start), and a crash test starts this script 20+ times; files.py needs only the
standard library.

    python tests/crash_writer.py loop DEST JSON SRC_A SRC_B
        prints "ready", then forever: DEST := a copy of SRC_A, then of SRC_B, ... (overwrite),
        and JSON := {"gen": i, ...}.
    python tests/crash_writer.py kill-at DEST SRC K
        one overwrite of DEST with a copy of SRC; SIGKILLs itself just before its K-th rename
        (`os.replace`), as a power cut or the OOM killer would stop it there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys

_FILES_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "sbert_flax", "common", "files.py")


def _files():
    spec = importlib.util.spec_from_file_location("_files_under_test", _FILES_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_into(files, src: str, dest: str) -> None:
    with files.atomic_directory(dest, overwrite=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def main(argv: list[str]) -> int:
    files = _files()
    if argv[0] == "loop":
        dest, json_path, *sources = argv[1:]
        print("ready", flush=True)
        i = 0
        while True:
            _copy_into(files, sources[i % len(sources)], dest)
            # Big enough that the kill can land mid-write, not only between files.
            files.write_json(json_path, {"gen": i, "pad": "x" * (1 << 16)})
            i += 1
    if argv[0] == "kill-at":
        dest, src, k = argv[1], argv[2], int(argv[3])
        real, calls = os.replace, [0]

        def replace(a, b):
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(a, b)

        files.os.replace = replace
        _copy_into(files, src, dest)
        return 0
    raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
