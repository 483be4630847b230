"""Same as `adapterhub-lite infer …`: serve a JSONL batch of requests, each through its own adapter."""

import sys

from adapterhub_lite.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
