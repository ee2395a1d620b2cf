#!/usr/bin/env python3
"""Check Cargo.lock against the RustSec advisory database.

    python3 scripts/audit.py                      # against the snapshot kept in the repository
    python3 scripts/audit.py --db PATH            # against a copy of rustsec/advisory-db
    python3 scripts/audit.py --snapshot PATH      # refresh the snapshot from such a copy

`cargo audit` fetches the database from GitHub, which CI cannot reach; so the repository keeps
a snapshot (scripts/advisories.json): the names of every crate with an advisory, and the
advisories of the crates in Cargo.lock. CI checks against it, and fails when Cargo.lock gains
a crate that has advisories the snapshot does not hold (refresh it). Prints every locked
package a (non-withdrawn) advisory affects, informational ones (unmaintained, unsound)
separately, and exits 1 on a vulnerability not listed in ACCEPTED below, 0 otherwise.
"""
import argparse
import datetime
import pathlib
import re
import sys
import json
import tomllib

SNAPSHOT = pathlib.Path(__file__).with_name("advisories.json")
VENDOR = pathlib.Path(__file__).parent.parent / "vendor"
# A snapshot whose newest advisory is older than this is reported: refresh it.
MAX_SNAPSHOT_AGE_DAYS = 60

# Advisories that affect a locked package and were looked at: id -> why it does not apply.
ACCEPTED = {
    "RUSTSEC-2023-0071": "rsa via sqlx-mysql encrypts the password with the server's public key "
    "only (caching_sha2_password without TLS); the Marvin timing attack needs private-key "
    "operations, which never run. With TLS to MySQL the password never goes through RSA.",
}


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


def advisories_from_db(db, name):
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
    assert snapshot_age_days("newest advisory dated 2026-01-01", datetime.date(2026, 3, 2)) == 60
    assert snapshot_age_days("?", datetime.date(2026, 3, 2)) is None
    assert "sqlx-core" in vendored() and "tcp-stream" in vendored()
    print("audit.py self-test passed")
    return 0


def vendored():
    """Names of the crates built from patched copies in vendor/ (they are crates.io releases
    too, and their advisories apply)."""
    names = set()
    for manifest in VENDOR.glob("*/Cargo.toml"):
        names.add(tomllib.loads(manifest.read_text())["package"]["name"])
    return names


def registry_packages(lock):
    patched = vendored()
    return [p for p in lock.get("package", [])
            if p.get("source", "").startswith("registry+") or p["name"] in patched]


def snapshot_age_days(taken, today):
    """Days between the newest advisory of the snapshot ("newest advisory dated YYYY-MM-DD")
    and today; None when the date cannot be read."""
    m = re.search(r"(\d{4})-(\d{2})-(\d{2})", taken)
    if not m:
        return None
    return (today - datetime.date(*map(int, m.groups()))).days


def write_snapshot(db, lock, path):
    names = sorted(p.name for p in (db / "crates").iterdir() if p.is_dir())
    wanted = sorted({p["name"] for p in registry_packages(lock)} & set(names))
    newest = max(
        (str(a["advisory"].get("date", "")) for n in names for a in advisories_from_db(db, n)),
        default="?",
    )
    snapshot = {
        "source": "https://github.com/rustsec/advisory-db",
        "taken": f"newest advisory dated {newest}",
        "crates_with_advisories": names,
        "advisories": {n: list(advisories_from_db(db, n)) for n in wanted},
    }
    path.write_text(json.dumps(snapshot, indent=1, sort_keys=True, default=str) + "\n")
    print(f"snapshot written: {len(names)} crates with advisories, {len(wanted)} of them locked")


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", type=pathlib.Path)
    ap.add_argument("--snapshot", type=pathlib.Path, metavar="DB")
    ap.add_argument("--lock", default="Cargo.lock", type=pathlib.Path)
    args = ap.parse_args()
    lock = tomllib.loads(args.lock.read_text())
    if args.snapshot:
        write_snapshot(args.snapshot, lock, SNAPSHOT)
        return 0
    if args.db:
        def advisories(name):
            return advisories_from_db(args.db, name)
        stale = []
    else:
        snap = json.loads(SNAPSHOT.read_text())
        held, listed = snap["advisories"], set(snap["crates_with_advisories"])

        def advisories(name):
            return held.get(name, [])
        stale = sorted({p["name"] for p in registry_packages(lock)
                        if p["name"] in listed and p["name"] not in held})
        print(f"advisory snapshot: {snap['taken']}")
        age = snapshot_age_days(snap["taken"], datetime.date.today())
        if age is None or age > MAX_SNAPSHOT_AGE_DAYS:
            print(f"warning: the advisory snapshot's newest entry is {age if age is not None else 'of unknown'} "
                  f"days old (over {MAX_SNAPSHOT_AGE_DAYS}): refresh it with --snapshot from a current "
                  "rustsec/advisory-db")
    vulnerable, unsound, informational, accepted = [], [], [], []
    for package in registry_packages(lock):
        name, version = package["name"], package["version"]
        for adv in advisories(name):
            a = adv["advisory"]
            if a.get("withdrawn"):
                continue
            versions = adv.get("versions", {})
            safe = versions.get("patched", []) + versions.get("unaffected", [])
            if any(matches(version, req) for req in safe):
                continue
            line = f"{name} {version}: {a['id']} {a.get('informational', 'vulnerability')}: {a.get('title', '')}".rstrip()
            if a.get("informational") == "unsound":
                unsound.append(line)
            elif a.get("informational"):
                informational.append(line)
            elif a["id"] in ACCEPTED:
                accepted.append(f"{line} (accepted: {ACCEPTED[a['id']]})")
            else:
                vulnerable.append(line)
    for line in vulnerable:
        print("VULNERABLE", line)
    for line in accepted:
        print("accepted", line)
    for line in unsound:
        print("UNSOUND", line)
    for line in informational:
        print("warning", line)
    for name in stale:
        print(f"STALE snapshot: {name} is locked and has advisories the snapshot does not hold; "
              "refresh it with --snapshot")
    packages = len(registry_packages(lock))
    print(f"{packages} registry packages checked: {len(vulnerable)} vulnerable, "
          f"{len(accepted)} accepted, {len(unsound)} unsound, {len(informational)} other warnings")
    return 1 if vulnerable or stale else 0


if __name__ == "__main__":
    sys.exit(main())
