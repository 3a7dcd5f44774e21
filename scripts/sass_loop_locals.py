#!/usr/bin/env python3
"""Checks that no local-memory access (spill or stack: STL/LDL) sits inside an mma K loop of
an entry point: reads `cuobjdump -sass` output, finds the loops (backward branches) that
contain an HMMA and span under 1500 instructions (the tiles' K loops; the task loop around
everything is larger), and fails when one of them holds an STL or LDL.
Usage: cuobjdump -sass X.cubin | scripts/sass_loop_locals.py ENTRY [ENTRY ...]"""
import re
import sys


def functions(text):
    """{name: [(address, instruction)]} of every function in the dump."""
    out, name = {}, None
    for line in text.split("\n"):
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and name:
            out[name].append((int(m.group(1), 16), m.group(2)))
    return out


def check(name, ins):
    loops = []
    for a, t in ins:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) <= a:
            loops.append((int(m.group(1), 16), a))
    mma = [(s, e) for s, e in loops
           if (e - s) // 16 < 1500 and any(s <= a <= e and "HMMA" in t for a, t in ins)]
    bad = [(hex(a), t) for a, t in ins
           if re.match(r"(@\S+\s+)?(STL|LDL)", t) and any(s <= a <= e for s, e in mma)]
    print(f"{name}: {len(mma)} mma loops, {len(bad)} local accesses in them")
    for a, t in bad[:8]:
        print(f"  {a} {t}")
    return not bad


def main():
    funcs = functions(sys.stdin.read())
    ok = True
    for name in sys.argv[1:]:
        if name not in funcs:
            sys.exit(f"FAIL: no function {name} in the dump")
        ok &= check(name, funcs[name])
    if not ok:
        sys.exit("FAIL: local memory inside an mma loop")


if __name__ == "__main__":
    main()
