"""Train the vqgan stage; runs under `deepspeed`, `torchrun` or plain `python` (see dalle_ar.cli.train)."""

import sys

from dalle_ar.cli.train import entry_main

if __name__ == "__main__":
    sys.exit(entry_main("vqgan"))
