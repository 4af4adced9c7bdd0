"""Read cost figures off a compiled XLA executable: FLOPs, memory, serial depth.

Serial depth is the number of dependent loop iterations the program runs: the
known trip counts of its ``while`` loops, multiplied through nesting and summed
over sequential loops. It is what bounds a scan on an accelerator, where each
loop step costs a kernel launch or more, however little work it does.
"""

from __future__ import annotations

import re
from typing import Any

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\bwhile\(.*?body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-, %]+)\}?")


def serial_depth(hlo_text: str) -> int:
    """Dependent loop iterations of an HLO module (1 for a loop-free program)."""
    comps: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line.strip())
        if m and "=" not in line.split("{")[0].split("(")[0]:
            current = m.group(1)
            comps[current] = []
            if line.lstrip().startswith("ENTRY"):
                entry = current
            continue
        if current is not None:
            comps[current].append(line)
    if entry is None:
        return 1

    memo: dict[str, int] = {}

    def depth(name: str, stack=()) -> int:
        if name in memo:
            return memo[name]
        if name in stack or name not in comps:
            return 0
        total = 0
        for line in comps[name]:
            w = _WHILE.search(line)
            if w:
                trip = _TRIP.search(line)
                n = int(trip.group(1)) if trip else 1
                total += n * max(1, depth(w.group(1), stack + (name,)))
                continue
            for group in _CALLS.findall(line):
                for callee in re.split(r"[,\s%]+", group):
                    if callee and callee in comps and callee != name:
                        total += depth(callee, stack + (name,))
        memo[name] = total
        return total

    return max(1, depth(entry))


def compiled_stats(compiled: Any) -> dict:
    """FLOPs, bytes of scratch/arguments/outputs, and serial depth of a compiled fn."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
    args = int(getattr(mem, "argument_size_in_bytes", 0)) if mem is not None else 0
    out = int(getattr(mem, "output_size_in_bytes", 0)) if mem is not None else 0
    return {
        "flops": float((cost or {}).get("flops", 0.0)),
        "temp_bytes": temp,
        "argument_bytes": args,
        "output_bytes": out,
        "peak_bytes": temp + args + out,
        "serial_depth": serial_depth(compiled.as_text()),
    }
