"""Same as `adapterhub-lite publish …`: publish an adapter folder to a registry."""

import sys

from adapterhub_lite.cli import main

if __name__ == "__main__":
    sys.exit(main(["publish", *sys.argv[1:]]))
