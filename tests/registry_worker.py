"""A publisher process for the concurrency and crash tests (imports no torch).

usage: python registry_worker.py HOME COUNT DIR:NAME [DIR:NAME ...]
Publishes COUNT times, cycling over the (directory, name) pairs; prints one line per
outcome: `ok NAME VERSION` or `err NAME ClassName`.
"""

from __future__ import annotations

import sys

from deltahub.errors import DeltahubError
from deltahub.registry import Registry


def main() -> None:
    home, count, pairs = sys.argv[1], int(sys.argv[2]), [p.split(":", 1) for p in sys.argv[3:]]
    registry = Registry(home)
    for i in range(count):
        directory, name = pairs[i % len(pairs)]
        try:
            v = registry.publish(directory, name=name)
            print(f"ok {name} {v.version}", flush=True)
        except DeltahubError as e:
            print(f"err {name} {type(e).__name__} {e}", flush=True)


if __name__ == "__main__":
    main()
