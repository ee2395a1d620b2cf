#!/usr/bin/env python3
"""Check Cargo.lock against a local copy of the RustSec advisory database.

    python3 scripts/audit.py --db PATH/TO/advisory-db [--lock Cargo.lock]

`cargo audit` needs to fetch the database from GitHub; where that is not reachable, clone or
copy https://github.com/rustsec/advisory-db anywhere and point --db at it. Prints every locked
package a (non-withdrawn) advisory affects, informational advisories (unmaintained, unsound)
separately, and exits 1 when a vulnerability is found, 0 otherwise.
"""
import argparse
import pathlib
import re
import sys
import tomllib


def parse_version(text):
    core = text.strip().split("+")[0]
    pre = ""
    if "-" in core:
        core, pre = core.split("-", 1)
    parts = [int(p) for p in core.split(".") if p != ""]
    while len(parts) < 3:
        parts.append(0)
    # A pre-release sorts before its release.
    return (parts[0], parts[1], parts[2], 0 if pre else 1, pre)


def matches(version, requirement):
    """True when `version` satisfies a Cargo requirement such as '>= 1.2, < 1.4' or '^0.3'."""
    v = parse_version(version)
    for comparator in requirement.split(","):
        c = comparator.strip()
        m = re.match(r"^(>=|<=|>|<|=|\^|~)?\s*([0-9][0-9A-Za-z.\-+]*)$", c)
        if not m:
            raise ValueError(f"cannot read requirement {requirement!r}")
        op, ver = m.group(1) or "^", m.group(2)
        given = len(ver.split("-")[0].split("."))
        r = parse_version(ver)
        if op == ">=":
            ok = v >= r
        elif op == ">":
            ok = v > r
        elif op == "<=":
            ok = v <= r
        elif op == "<":
            ok = v < r
        elif op == "=":
            ok = v[:3] == r[:3] if given == 3 else v[:given] == r[:given]
        elif op == "~":
            upper = (r[0], r[1] + 1, 0) if given >= 2 else (r[0] + 1, 0, 0)
            ok = v >= r and v[:3] < upper
        else:  # caret
            if r[0] > 0 or given == 1:
                upper = (r[0] + 1, 0, 0)
            elif r[1] > 0 or given == 2:
                upper = (0, r[1] + 1, 0)
            else:
                upper = (0, 0, r[2] + 1)
            ok = v >= r and v[:3] < upper
        if not ok:
            return False
    return True


def advisories(db, name):
    folder = db / "crates" / name
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.md")):
        text = path.read_text()
        m = re.search(r"```toml\n(.*?)\n```", text, re.S)
        if m:
            adv = tomllib.loads(m.group(1))
            title = re.search(r"^# (.*)$", text[m.end():], re.M)
            adv["advisory"].setdefault("title", title.group(1) if title else "")
            yield adv


def self_test():
    assert matches("1.2.3", ">= 1.2.0")
    assert not matches("1.1.9", ">= 1.2.0")
    assert matches("0.3.5", "^0.3.1") and not matches("0.4.0", "^0.3.1")
    assert matches("1.9.0", "^1.2") and not matches("2.0.0", "^1.2")
    assert matches("0.0.3", "^0.0.3") and not matches("0.0.4", "^0.0.3")
    assert matches("1.2.9", "~1.2.3") and not matches("1.3.0", "~1.2.3")
    assert matches("1.5.0", ">= 1.4.0, < 1.6.0") and not matches("1.6.0", ">= 1.4.0, < 1.6.0")
    assert not matches("1.0.0-rc.1", ">= 1.0.0")
    print("audit.py self-test passed")
    return 0


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True, type=pathlib.Path)
    ap.add_argument("--lock", default="Cargo.lock", type=pathlib.Path)
    args = ap.parse_args()
    lock = tomllib.loads(args.lock.read_text())
    vulnerable, informational = [], []
    for package in lock.get("package", []):
        if package.get("source", "").startswith("registry+") is False:
            continue
        name, version = package["name"], package["version"]
        for adv in advisories(args.db, name):
            a = adv["advisory"]
            if a.get("withdrawn"):
                continue
            versions = adv.get("versions", {})
            safe = versions.get("patched", []) + versions.get("unaffected", [])
            if any(matches(version, req) for req in safe):
                continue
            line = f"{name} {version}: {a['id']} {a.get('informational', 'vulnerability')}: {a.get('title', '')}".rstrip()
            (informational if a.get("informational") else vulnerable).append(line)
    for line in vulnerable:
        print("VULNERABLE", line)
    for line in informational:
        print("warning", line)
    packages = sum(1 for p in lock.get("package", []) if p.get("source", "").startswith("registry+"))
    print(f"{packages} registry packages checked: {len(vulnerable)} vulnerable, {len(informational)} warnings")
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
