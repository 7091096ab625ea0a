"""rebuild_index in a loop, for the random-kill test (tests/test_rebuild_kill.py).

    python rebuild_child.py FOLDER KIND [KIND ...]

Prints "ready" once the index is loaded, then rebuilds it to each KIND in turn, forever,
printing "done KIND" after each, until the test SIGKILLs it at a random moment.
"""

import sys

from nnsim_hooks.index import load_index


def main():
    folder, kinds = sys.argv[1], sys.argv[2:]
    idx = load_index(folder)
    print("ready", flush=True)
    while True:
        for kind in kinds:
            idx.rebuild_index(kind, progress=False)
            print("done", kind, flush=True)


if __name__ == "__main__":
    main()
