"""Read cost figures off a compiled XLA executable: FLOPs, memory, serial depth.

Serial depth is the number of dependent loop iterations the program runs: the
known trip counts of its ``while`` loops, multiplied through nesting and summed
over sequential loops. It is what bounds a scan on an accelerator, where each
loop step costs a kernel launch or more, however little work it does.

FLOPs: XLA's ``cost_analysis()`` counts a ``while`` body once, whatever its trip
count, so for a scan it reports one step's work. :func:`loop_flops` re-counts
the compiled HLO with every loop body multiplied by its known trip count
(elementwise op = 1 flop per element, dot = 2·M·N·K, reduce = reducer ops per
reduced element), which agrees with XLA's count on loop-free programs.
"""

from __future__ import annotations

import re
from typing import Any

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\bwhile\(.*?body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-, %]+)\}?")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """The body lines of every computation of an HLO module, and the entry's name."""
    comps: dict[str, list[str]] = {}
    entry = current = None
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
    return comps, entry


def serial_depth(hlo_text: str) -> int:
    """Dependent loop iterations of an HLO module (1 for a loop-free program)."""
    comps, entry = _computations(hlo_text)
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


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_SHAPE = re.compile(r"\b(?:pred|[suf]\d+|bf16|f8\w*|c64|c128)\[([\d,]*)\]")
_FREE = frozenset((
    "parameter", "constant", "bitcast", "broadcast", "reshape", "transpose", "copy",
    "slice", "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "iota",
    "get-tuple-element", "tuple", "convert", "gather", "scatter", "reverse",
    "bitcast-convert", "copy-start", "copy-done", "after-all", "opt-barrier",
    "partition-id", "replica-id", "custom-call", "rng-get-and-update-state"))


def _elements(shape_text: str) -> int:
    """Elements of the first array shape in ``shape_text`` (1 for a scalar)."""
    m = _SHAPE.search(shape_text)
    if not m:
        return 0
    n = 1
    for d in filter(None, m.group(1).split(",")):
        n *= int(d)
    return n


def _dims(shape_text: str) -> list:
    m = _SHAPE.search(shape_text)
    return [int(d) for d in filter(None, m.group(1).split(","))] if m else []


def _split_instruction(rest: str):
    """(shape text, opcode, operand text, attribute text) of one HLO instruction."""
    if rest.startswith("("):                      # tuple shape: skip balanced parens
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    m = re.match(r"([\w\-]+)\((.*)$", rest)
    if not m:
        return shape, "", "", ""
    opcode, tail = m.group(1), m.group(2)
    depth = 1
    for i, ch in enumerate(tail):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            break
    return shape, opcode, tail[:i], tail[i + 1:]


def loop_flops(hlo_text: str) -> float:
    """FLOPs of an HLO module with loop bodies counted trip-count times.

    A loop without a known trip count is counted once (as XLA does).
    """
    lines, entry = _computations(hlo_text)
    if entry is None:
        return 0.0
    comps: dict[str, list] = {}
    shapes: dict[str, str] = {}
    for name, body in lines.items():
        comps[name] = []
        for line in body:
            m = _INSTR.match(line)
            if m:
                shape, opcode, operands, attrs = _split_instruction(m.group(2))
                shapes[m.group(1)] = shape
                comps[name].append((shape, opcode, operands, attrs))

    memo: dict[str, float] = {}

    def callees(attrs: str, key: str) -> list:
        m = re.search(key + r"=\{?([^}]*?)\}?(?:,\s*\w+=|$)", attrs)
        if not m:
            return []
        return [c.lstrip("%") for c in re.split(r"[,\s]+", m.group(1)) if c.strip("%")]

    def operand_shape(operands: str, index: int) -> str:
        names = re.findall(r"%([\w.\-]+)", operands)
        return shapes.get(names[index], "") if index < len(names) else ""

    def flops(name: str, stack=()) -> float:
        if name in memo:
            return memo[name]
        if name in stack or name not in comps:
            return 0.0
        stack = stack + (name,)
        total = 0.0
        for shape, opcode, operands, attrs in comps[name]:
            if opcode in _FREE or not opcode:
                continue
            if opcode == "while":
                trip = _TRIP.search(attrs)
                n = int(trip.group(1)) if trip else 1
                body = sum(flops(c, stack) for c in callees(attrs, "body"))
                cond = sum(flops(c, stack) for c in callees(attrs, "condition"))
                total += n * (body + cond)
            elif opcode in ("fusion", "call", "async-start"):
                total += sum(flops(c, stack) for c in
                             callees(attrs, "calls") or callees(attrs, "to_apply"))
            elif opcode == "conditional":
                total += max([flops(c, stack) for c in callees(attrs, "branch_computations")]
                             or [0.0])
            elif opcode == "dot":
                lhs = _dims(operand_shape(operands, 0))
                m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
                k = 1
                for d in (m.group(1).split(",") if m and m.group(1) else []):
                    k *= lhs[int(d)] if int(d) < len(lhs) else 1
                total += 2.0 * _elements(shape) * k
            elif opcode in ("reduce", "reduce-window"):
                reducer = sum(flops(c, stack) for c in callees(attrs, "to_apply"))
                if opcode == "reduce":
                    count = _elements(operand_shape(operands, 0)) - _elements(shape)
                else:
                    w = re.search(r"size=([\dx]+)", attrs)
                    size = 1
                    for d in (w.group(1).split("x") if w else []):
                        size *= int(d)
                    count = _elements(shape) * max(0, size - 1)
                total += max(0, count) * max(1.0, reducer)
            else:                                  # elementwise and the rest: 1 per element
                total += _elements(shape)
        memo[name] = total
        return total

    return flops(entry)


def compiled_stats(compiled: Any) -> dict:
    """FLOPs, bytes of scratch/arguments/outputs, and serial depth of a compiled fn.

    ``flops`` is XLA's own count (loop bodies once); ``loop_flops`` multiplies
    loop bodies by their trip counts (see :func:`loop_flops`).
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
    args = int(getattr(mem, "argument_size_in_bytes", 0)) if mem is not None else 0
    out = int(getattr(mem, "output_size_in_bytes", 0)) if mem is not None else 0
    text = compiled.as_text()
    return {
        "flops": float((cost or {}).get("flops", 0.0)),
        "loop_flops": loop_flops(text),
        "temp_bytes": temp,
        "argument_bytes": args,
        "output_bytes": out,
        "peak_bytes": temp + args + out,
        "serial_depth": serial_depth(text),
    }
