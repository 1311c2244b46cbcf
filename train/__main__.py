"""`python -m iecl.train ...` is `iecl pretrain ...` (what torchrun launches)."""

import signal
import sys

# Until pretrain installs its own handlers (train/signals.py), a stop signal
# during the imports ends the process quietly with the usual status.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

from iecl.train.cli import main  # after the handlers, on purpose

sys.exit(main(["pretrain", *sys.argv[1:]]))
