#!/usr/bin/python3
"""bench_vm_table.py LOG: the table `make bench-vm` prints, from the figures in LOG.

LOG is the output of `tests/vm/run-e2e l2-topology-ours l2-topology-stock`, whose
tests/vm/topology.py prints lines `figure: ours|stock KEY=VALUE` (the last one of a key
counts: a retried step prints its figures again). Prints GET /1.0 through /dev/lxd/sock
in L2, ours | stock: the sequential p50/p99, req/s (p50/p99, failed requests) at
concurrency 1, 8 and 64, then the ratio stock p50 / ours p50 against the 3x target (issue 14; issue 7 asked 1.5x).
Exits 1, saying which figure, when one is missing; 2 on a usage error.
"""
import math
import re
import sys

KINDS = ("ours", "stock")
LEVELS = (1, 8, 64)
TARGET = 3.0
FIGURE = re.compile(r"^figure: (ours|stock) ([\w.]+)=(\S+)$")


def read_figures(path: str) -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {k: {} for k in KINDS}
    with open(path, errors="replace") as f:
        for line in f:
            m = FIGURE.match(line.rstrip("\n"))
            if m:
                figures[m[1]][m[2]] = float(m[3])
    return figures


def ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    figures = read_figures(argv[0])

    def get(kind: str, key: str) -> float:
        if key not in figures[kind]:
            raise LookupError(f"{argv[0]} has no `figure: {kind} {key}=` line "
                              f"(did the l2-topology-{kind} step fail or stop early?)")
        return figures[kind][key]

    try:
        rows = [("sequential p50", [f"{ms(get(k, 'get_1.0_p50_ms'))} ms" for k in KINDS]),
                ("sequential p99", [f"{ms(get(k, 'get_1.0_p99_ms'))} ms" for k in KINDS])]
        for level in LEVELS:
            c = f"c{level}"
            rows.append((f"c{level} req/s (p50/p99 ms, failed)",
                         [f"{get(k, c + '_rps'):.1f} ({ms(get(k, c + '_p50_ms'))}/"
                          f"{ms(get(k, c + '_p99_ms'))}, {get(k, c + '_errors'):.0f} of "
                          f"{get(k, c + '_n'):.0f})" for k in KINDS]))
        ours, stock = get("ours", "get_1.0_p50_ms"), get("stock", "get_1.0_p50_ms")
    except LookupError as e:
        print(f"bench_vm_table.py: {e}", file=sys.stderr)
        return 1
    width = max(len(r[0]) for r in rows)
    col = max(len(v) for r in rows for v in r[1])
    print("== bench-vm: GET /1.0 via /dev/lxd/sock in L2 over real vsock, python client, a new "
          "connection each")
    print(f"  {'':<{width}}  {'ours':<{col}}  stock")
    for label, (a, b) in rows:
        print(f"  {label:<{width}}  {a:<{col}}  {b}")
    ratio = stock / ours
    print(f"  stock p50 / ours p50 = {stock:.1f} / {ours:.1f} = {ratio:.2f}x "
          f"(target >= {TARGET}x: {'met' if ratio >= TARGET else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
