"""Text edits to llama.cpp's sources before the CUDA module is built, shared
by scripts/gpu/patch-*.py: each edit replaces exactly one occurrence (the
script fails if the code moved), and a file that already carries the
patch's mark is left alone, so a patch can be applied twice."""
import pathlib
import sys


def patch(root, mark, path, edits):
    """Apply `edits` ((old, new) pairs) to ROOT/PATH unless it holds `mark`."""
    p = pathlib.Path(root) / path
    text = p.read_text()
    if mark in text:
        print(f"{path}: already patched")
        return
    for old, new in edits:
        if text.count(old) != 1:
            sys.exit(f"{path}: expected exactly one occurrence of:\n{old}")
        text = text.replace(old, new)
    p.write_text(text)
    print(f"{path}: patched")
