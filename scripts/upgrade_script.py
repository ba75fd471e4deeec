#!/usr/bin/env python3
"""Rebuild sql/pg_fence--0.1.0--0.2.0.sql after a change to sql/fence.sql,
sql/stats.sql or the extension's C functions.

The script has three hand-kept parts and two generated ones:
  1. its head, up to "-- New C functions" (hand-written: catalog changes);
  2. the C functions that 0.1.0 did not have, as the 0.2.0 install script
     declares them (generated from `cargo pgrx schema`, schema-qualified);
  3. sql/fence.sql and sql/stats.sql, verbatim (every statement in them is
     CREATE OR REPLACE or guarded, so they run over 0.1's objects);
  4. its tail, from "-- Tables fenced under 0.1" (hand-written).

Usage: cargo pgrx schema -p pg_fence pg15 -o target/schema.sql
       scripts/upgrade_script.py target/schema.sql
tests/tests/upgrade.rs compares an upgraded database with a fresh one, so a
stale script fails the tests.
"""
import re
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
script = root / "sql/pg_fence--0.1.0--0.2.0.sql"
old = (root / "sql/pg_fence--0.1.0.sql").read_text()
generated = Path(sys.argv[1]).read_text()
current = script.read_text()

NEW_FUNCTIONS = "-- New C functions"
TAIL = "-- Tables fenced under 0.1"
head = current[: current.index(NEW_FUNCTIONS)]
tail = current[current.index(TAIL):]

function = re.compile(r'CREATE\s+FUNCTION\s+"?(\w+)"?\((.*?)AS \'MODULE_PATHNAME\', \'\w+\';', re.S)
known = {m.group(1) for m in function.finditer(old)}
blocks = []
for m in function.finditer(generated):
    name = m.group(1)
    if name in known:
        continue
    text = re.sub(r'[ \t]*/\*.*?\*/', '', m.group(0))
    text = re.sub(r'CREATE\s+FUNCTION\s+"?(\w+)"?\(', lambda f: f'CREATE FUNCTION fence."{f.group(1)}"(', text, count=1)
    blocks.append((name, text))
blocks.sort()

parts = [head.rstrip() + "\n\n"]
parts.append(f"{NEW_FUNCTIONS} (reach.rs, keylock.rs, stats.rs, waiters.rs), as the 0.2.0 install script declares them.\n")
parts.append("\n\n".join(text for _, text in blocks) + "\n\n")
parts.append("-- sql/fence.sql as of 0.2.0: protect() needs fence_admin and trusted\n"
             "-- columns, fences reach partitions and inheritance children, the DDL event\n"
             "-- triggers, fence.blockers, refused writes in fence.protected_tables.\n")
parts.append((root / "sql/fence.sql").read_text().rstrip() + "\n\n")
parts.append("-- sql/stats.sql as of 0.2.0: the statistics and waiters views.\n")
parts.append((root / "sql/stats.sql").read_text().rstrip() + "\n\n")
parts.append(tail)
script.write_text("".join(parts))
print(f"{script.relative_to(root)}: {len(blocks)} new C functions")
