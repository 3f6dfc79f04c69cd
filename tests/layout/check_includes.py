#!/usr/bin/env python3
"""Checks every #include of the project's own headers against the allowed arrows between folders
and runtime rooms (docs/architecture.md, "Targets"). Each CMake target's link line already lists
only its neighbours, but every target's include root is the repository root, so without this
check a header-only wrong-way include (kv/ including engine/) would still compile.

Usage: check_includes.py [ROOT]   (exit 1 and one line per offending include)
"""
import pathlib
import re
import sys

# folder (longest prefix wins) -> folders its files may include. A folder may always include itself.
ALLOWED = {
    "kernels": [],
    "parallel": ["kernels"],
    "runtime/model": ["kernels", "parallel"],
    "runtime/tokenizer": ["runtime/model", "kernels", "parallel"],
    "runtime/kv": ["kernels", "parallel"],
    "runtime/backend": ["runtime/model", "runtime/kv", "kernels", "parallel"],
    "runtime/engine": ["runtime/backend", "runtime/tokenizer", "runtime/model", "runtime/kv",
                       "kernels", "parallel"],
    "launch": ["runtime", "kernels", "parallel", "proto"],
    "tests": ["launch", "runtime", "kernels", "parallel", "proto", "tests"],
}
OURS = ("kernels/", "parallel/", "runtime/", "launch/", "proto/", "tests/")
SOURCES = (".h", ".cc", ".cu", ".cuh")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def owner(rel: str):
    best = None
    for folder in ALLOWED:
        if rel == folder or rel.startswith(folder + "/"):
            if best is None or len(folder) > len(best):
                best = folder
    return best


def allowed(src_owner: str, target: str) -> bool:
    if not target.startswith(OURS):
        return True  # a system or third-party header, or a generated one found by its own path
    for ok in [src_owner] + ALLOWED[src_owner]:
        if target == ok or target.startswith(ok + "/"):
            return True
    return False


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parents[2])
    bad = []
    for path in sorted(root.rglob("*")):
        if path.suffix not in SOURCES or not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("build", "third_party", ".git")):
            continue
        src_owner = owner(rel)
        if src_owner is None:
            continue
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            m = INCLUDE.match(line)
            if m and not allowed(src_owner, m.group(1)):
                bad.append(f"{rel}:{lineno}: {src_owner}/ may not include {m.group(1)} "
                           f"(allowed: {', '.join([src_owner] + ALLOWED[src_owner])})")
    for b in bad:
        print(b)
    if bad:
        print(f"check_includes: {len(bad)} wrong-way include(s); the arrows are in docs/architecture.md")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
