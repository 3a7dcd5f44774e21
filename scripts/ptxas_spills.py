#!/usr/bin/env python3
"""Checks ptxas -v spill reports against the kernels' rules (kernel/check.sh and CI):
- every kernel (flashmoe P2P, flashmoe_nvshmem, model_ops, abi_probe): no function of ours
  spills;
- flashmoe_nvshmem: NVSHMEM's own nvshmemi_* functions (its library's code, linked in) are
  reported and allowed.
Usage: ptxas_spills.py REPORT            (the build's flashmoe-ptxas-report.txt, whose
                                          sections start with "== NAME ==")
       ptxas_spills.py --section NAME LOG (one ptxas -v log of kernel NAME)"""
import re
import sys

def sections(text):
    """{name: log} of a report with "== NAME ==" headers."""
    out, name = {}, None
    for line in text.split("\n"):
        m = re.match(r"== (\S+) ==$", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def spills(log):
    """(function, stores, loads) of every function that spills."""
    fn, out = None, []
    for line in log.split("\n"):
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            fn = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and fn and (int(m.group(1)) or int(m.group(2))):
            out.append((fn, int(m.group(1)), int(m.group(2))))
    return out


def check(name, log):
    """Prints each spilling function with its verdict; returns the number of violations."""
    bad = 0
    for fn, st, ld in spills(log):
        if name == "flashmoe_nvshmem" and re.match(r"(_Z\d+)?nvshmemi_", fn):
            verdict = "allowed (NVSHMEM's own)"
        else:
            verdict = "SPILL"
            bad += 1
        print(f"{name}: {verdict}: {fn}: {st} bytes stored, {ld} loaded")
    return bad


def main():
    args = sys.argv[1:]
    if len(args) == 3 and args[0] == "--section":
        logs = {args[1]: open(args[2]).read()}
    elif len(args) == 1:
        logs = sections(open(args[0]).read())
    else:
        sys.exit(__doc__)
    bad = sum(check(name, log) for name, log in logs.items())
    if bad:
        sys.exit(f"FAIL: {bad} function(s) spill past their rule")
    print(f"ok: spills within their rules ({', '.join(sorted(logs))})")


if __name__ == "__main__":
    main()
