"""Print the installed version of every package the lock pins, marking those that differ from it.

`make test-latest` runs it before the suite, so a failure there comes with the versions that moved.
"""

import sys
from importlib.metadata import PackageNotFoundError, version


def pins(lock_file: str) -> dict[str, str]:
    found = {}
    for line in open(lock_file):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, _, pinned = line.partition("==")
            found[name.strip().lower().replace("_", "-")] = pinned.split(";")[0].strip()
    return found


def main(lock_file: str) -> None:
    moved = 0
    for name, pinned in sorted(pins(lock_file).items()):
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "not installed"
        if installed != pinned:
            moved += 1
            print(f"  {name:<28} {pinned:>14} -> {installed}")
    print(f"{moved} package(s) differ from {lock_file}" + (" (listed above)" if moved else ""))


if __name__ == "__main__":
    main(sys.argv[1])
