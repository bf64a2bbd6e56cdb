#!/usr/bin/env python3
"""The crate's import graph between files of src/, from every `crate::` /
`super::` / `self::` path in the code (`use` lines and paths written inline),
tests left out (`tests.rs` files and `#[cfg(test)] mod tests` blocks).

Checks, and exits 1 when one fails:
  - no import cycle between files (every strongly connected component is one
    file);
  - no file in src/ over MAX_LINES lines (tests left out);
  - with --layers: each file's layer (the LAYERS list below, lowest first)
    is at least that of every file it imports: nothing runs from a lower
    layer up.

Usage: scripts/import-graph.py [--dot] [--layers]
  --dot     print the graph in Graphviz form instead of checking.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "src"
MAX_LINES = 800

# Lowest first: a file may import its own layer and those before it.
LAYERS = [
    # Pure leaves.
    ["errors", "http", "ron_util", "request::outcome", "request::control_text",
     "engine::layout", "engine::kv_snapshot"],
    ["settings", "constraint"],
    ["request", "registry", "dialogue::data"],
    # The engine's pure cores and its protocol.
    ["engine::config", "engine::shaper", "engine::slots", "engine::scheduler",
     "engine::load_intent", "engine::text_stream", "engine::sampler",
     "engine::row_pool", "engine::protocol"],
    ["events", "hardware"],
    # The engine's llama.cpp and remote sides.
    ["engine::prompt", "engine::device_sampling", "engine::constraint_jobs",
     "engine::delivery", "engine::token_choice", "engine::model_meta",
     "engine::serve", "engine::backend", "registry::from_gguf"],
    # The Bevy glue.
    ["download", "engine::bridge", "engine", "plugin"],
    ["dialogue"],
    ["overlay", "fuzzing", "lib"],
]


def module_of(path: pathlib.Path) -> list[str]:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts == ["lib"]:
        return []
    return parts


def code_without_tests(text: str) -> str:
    # A `#[cfg(test)]` followed by `mod tests` (inline or not) ends the code.
    m = re.search(r"#\[cfg\(test\)\]\s*mod tests\b", text)
    text = text[: m.start()] if m else text
    # Comments name paths too; leave them out.
    return re.sub(r"//[^\n]*", "", text)


def main() -> int:
    files = {}
    for p in sorted(ROOT.rglob("*.rs")):
        if p.name == "tests.rs":
            continue
        files[tuple(module_of(p))] = p
    graph = {m: set() for m in files}
    # Names a module re-exports (`pub use path::{A, B}` / `pub use path::A`),
    # so a path through the re-export counts as an import of its source.
    reexports = {}
    for mod, p in files.items():
        code = code_without_tests(p.read_text())
        for m in re.finditer(r"pub(?:\(crate\))?\s+use\s+([\w:]+?)(?:::\{([^}]*)\}|::(\w+))\s*;", code):
            src = m.group(1).split("::")
            names = [n.strip().split(" as ")[-1].strip() for n in (m.group(2) or m.group(3)).split(",")]
            base = src[0]
            if base == "crate":
                src_mod = src[1:]
            elif base == "super":
                src_mod = list(mod[:-1]) + src[1:]
            elif base == "self":
                src_mod = list(mod) + src[1:]
            else:
                src_mod = list(mod) + src
            for n in names:
                # (An inline module's re-export of the crate root's own names,
                # like the prelude's, is no re-export of another file.)
                if n and src_mod != list(mod):
                    reexports.setdefault((mod, n), src_mod + [n])
    big = []
    for mod, p in files.items():
        code = code_without_tests(p.read_text())
        lines = code.count("\n")
        if lines > MAX_LINES:
            big.append((lines, p.relative_to(ROOT.parent)))
        # Expand `use a::{b, c::{d}}` groups into paths.
        paths = set()
        for m in re.finditer(r"\b(crate|super|self)((?:::\w+)+)(::\{)?", code):
            base = m.group(1)
            rest = m.group(2).split("::")[1:]
            if m.group(3):
                # Group: take the names at its first level too.
                depth, j, names, cur = 1, m.end(), [], ""
                while j < len(code) and depth:
                    c = code[j]
                    if c == "{":
                        depth += 1
                    elif c == "}":
                        depth -= 1
                    if depth == 1 and c not in "{},":
                        cur += c
                    elif c in ",}" and depth <= 1:
                        names.append(cur.strip())
                        cur = ""
                    j += 1
                for n in names:
                    n = n.split(" as ")[0].strip()
                    if n and n != "self":
                        paths.add((base, tuple(rest + n.split("::"))))
            paths.add((base, tuple(rest)))
        for base, rest in paths:
            # `self` is this module, `super` its parent (whatever the file
            # layout), `crate` the root.
            target = [] if base == "crate" else list(mod) if base == "self" else list(mod[:-1])
            rest = list(rest)
            while rest and rest[0] == "super":
                target, rest = target[:-1], rest[1:]
            target += rest
            # Through re-exports to the source, then the longest prefix that
            # is a file.
            for _ in range(4):
                for k in range(len(target), -1, -1):
                    t = tuple(target[:k])
                    if t in files:
                        if k < len(target) and (t, target[k]) in reexports and t != mod:
                            target = reexports[(t, target[k])] + target[k + 1 :]
                        break
                else:
                    break
            for k in range(len(target), -1, -1):
                t = tuple(target[:k])
                if t in files:
                    if t != mod:
                        graph[mod].add(t)
                    break
    if "--dot" in sys.argv:
        print("digraph imports {")
        for a, bs in sorted(graph.items()):
            for b in sorted(bs):
                print(f'  "{"::".join(a) or "lib"}" -> "{"::".join(b) or "lib"}";')
        print("}")
        return 0
    failed = False
    # Tarjan's strongly connected components.
    index, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    for comp in sccs:
        if len(comp) > 1:
            failed = True
            names = sorted("::".join(c) or "lib" for c in comp)
            edges = sorted(
                f"{'::'.join(a) or 'lib'} -> {'::'.join(b) or 'lib'}"
                for a in comp
                for b in graph[a]
                if b in comp
            )
            print(f"import cycle between {', '.join(names)}: {'; '.join(edges)}")
    for lines, p in big:
        failed = True
        print(f"{p}: {lines} lines (tests left out), more than {MAX_LINES}")
    if "--layers" in sys.argv:

        def layer(m):
            name = "::".join(m) or "lib"
            best = None
            for i, layer_mods in enumerate(LAYERS):
                for lm in layer_mods:
                    if name == lm or name.startswith(lm + "::"):
                        if best is None or len(lm) > best[1]:
                            best = (i, len(lm))
            return None if best is None else best[0]

        for a, bs in sorted(graph.items()):
            la = layer(a)
            if la is None:
                failed = True
                print(f"{'::'.join(a) or 'lib'}: in no layer of scripts/import-graph.py")
                continue
            for b in sorted(bs):
                lb = layer(b)
                if lb is not None and lb > la:
                    failed = True
                    print(
                        f"{'::'.join(a) or 'lib'} (layer {la}) imports "
                        f"{'::'.join(b) or 'lib'} (layer {lb}): from a lower layer up"
                    )
    if not failed:
        n = sum(len(b) for b in graph.values())
        print(f"import-graph: {len(files)} files, {n} imports, no cycle, none over {MAX_LINES} lines")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
