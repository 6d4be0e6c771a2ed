"""Command line: ``python -m helpers prepare`` builds (or verifies) the bundled checkpoint."""

import sys

from .checkpoints import CacheError, CheckpointError, bundled_checkpoint


def main(argv: list[str]) -> int:
    """``prepare``: build or verify the bundled checkpoint; 0 on success. Run by the set-up; notebook 00 explains the model."""
    if argv[:1] != ["prepare"]:
        print("usage: python -m helpers prepare", file=sys.stderr)
        return 2
    try:
        path = bundled_checkpoint()
    except (CacheError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"bundled model ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
