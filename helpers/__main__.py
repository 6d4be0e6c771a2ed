"""Command line: ``python -m helpers prepare`` builds (or verifies) the bundled model and sweeps offload folders."""

import sys

from .checkpoints import CacheError, CheckpointError, bundled_checkpoint, sweep_offload_folders


def main(argv: list[str]) -> int:
    """``prepare``: build or verify the bundled checkpoint; 0 on success, 1 on an error (printed), 2 on bad usage.

    The set-up runs it; notebook 00 explains the model.

    It also removes the offload folders that interrupted notebooks left in ``<cache>/offload``
    (``helpers.checkpoints.sweep_offload_folders``: only folders the workbook made, of processes that no
    longer run) and prints each one it removed.
    """
    if argv[:1] != ["prepare"]:
        print("usage: python -m helpers prepare", file=sys.stderr)
        return 2
    try:
        path = bundled_checkpoint()
        removed = sweep_offload_folders()
    except (CacheError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for folder in removed:
        print(f"removed the offload folder of an interrupted notebook: {folder}")
    print(f"bundled model ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
