#!/usr/bin/env python3
"""Fail when the workspace's declared rust-version is lower than a locked dependency's own.

Only one toolchain can be installed where CI runs, so the MSRV cannot be built directly; this
keeps the declaration honest against Cargo.lock (needs `cargo fetch` to have run).
"""
import glob
import os
import re
import sys

def version(text):
    parts = [int(x) for x in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))

root = os.path.join(os.path.dirname(__file__), "..")
manifest = open(os.path.join(root, "Cargo.toml")).read()
declared = version(re.search(r'^rust-version\s*=\s*"([^"]+)"', manifest, re.M).group(1))
lock = open(os.path.join(root, "Cargo.lock")).read()
registry = os.path.join(os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo")), "registry", "src")
worst = []
for name, ver in re.findall(r'\[\[package\]\]\nname = "([^"]+)"\nversion = "([^"]+)"\nsource = "registry', lock):
    for path in glob.glob(os.path.join(registry, "*", f"{name}-{ver}", "Cargo.toml")):
        m = re.search(r'^rust-version\s*=\s*"([^"]+)"', open(path).read(), re.M)
        if m and version(m.group(1)) > declared:
            worst.append(f"{name} {ver} needs Rust {m.group(1)}")
        break
if worst:
    print("declared rust-version %s is too low:\n  %s" % (".".join(map(str, declared)), "\n  ".join(sorted(set(worst)))))
    sys.exit(1)
print("rust-version %s covers every locked dependency" % ".".join(map(str, declared)))
