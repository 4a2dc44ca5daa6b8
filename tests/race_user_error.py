"""Both ranks of a torchrun job stop with the same user error at the same moment, on a machine so
loaded that a line written to stderr takes RACE_PRINT_DELAY_S to land (tests/test_launch_faults.py).
RACE_BEFORE_GROUP=1 raises before the process group exists."""

import os
import sys
import time

import torch.distributed as dist

from megatron_lite.cli import run_main
from megatron_lite.errors import UserError


class SlowStream:
    """stderr on a loaded machine: each write waits a while before it lands."""

    def __init__(self, stream, delay: float) -> None:
        self.stream, self.delay = stream, delay

    def write(self, text: str) -> int:
        time.sleep(self.delay)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def main() -> int:
    sys.stderr = SlowStream(sys.stderr, float(os.environ.get("RACE_PRINT_DELAY_S", "0")))
    if os.environ.get("RACE_BEFORE_GROUP") != "1":
        dist.init_process_group("gloo")
        dist.barrier()
    raise UserError("--window-size 16,0: a racing user error")


if __name__ == "__main__":
    sys.exit(run_main(main))
