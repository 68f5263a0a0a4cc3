"""python -m fastattn {demo,info,bench}: the worked example, a bug-report summary, benchmarks."""
from __future__ import annotations

import sys

COMMANDS = {
    "demo": "the maths of attention on a tiny worked example (and a quick timing)",
    "info": "versions, backends, threads and GPU: paste this into a bug report",
    "bench": "benchmarks against NumPy and PyTorch (see --help)",
}


def usage() -> str:
    lines = ["usage: python -m fastattn {demo,info,bench} [options]   (or --version, --help)", ""]
    lines += [f"  {name:6} {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"fastattn {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"python -m fastattn: unknown command {command!r}; the commands are "
              f"{', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    if command == "demo":
        from .demo import main as run
    elif command == "info":
        from .info import main as run
    else:
        from .bench import main as run
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
