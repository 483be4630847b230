"""Same as `adapterhub-lite train …`: train one task adapter from a YAML spec."""

import sys

from adapterhub_lite.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
