"""``flower-supernode`` with short polling waits, for deployments where a round is seconds long.

Flower 1.41's SuperNode waits 3 s between asks for new messages when it is idle and 0.5 s
between looks for a finished reply; its SuperExec waits 1 s between asks for a task to
launch. In a round of a few seconds these fixed waits add 1.5-4.5 s on average per message.
This command runs Flower's own SuperNode unchanged except for those waits, capped at
``--poll-interval`` seconds (default 0.2). Every other argument goes to
``flower-supernode`` as given:

    python -m client_app.supernode --poll-interval 0.2 --superlink HOST:9092 ...

The cost is more idle requests to the SuperLink (one per node every ``--poll-interval``
seconds instead of every 3 s): right for a handful of nodes, not for thousands. The waits
are found in Flower's module; if a Flower version no longer has them the command says so
and runs Flower's SuperNode with its own waits.
"""

import argparse
import logging
import os
import sys
import time
from typing import Any

logger = logging.getLogger("fedra.supernode")

SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own setting for the SuperExec's wait
DEFAULT_POLL = 0.2


class ShortWaits:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: every sleep capped."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_waits(cap: float) -> bool:
    """Cap the SuperNode's polling sleeps (and its SuperExec's) at ``cap`` s; False if Flower's layout differs."""
    if not 0.01 <= cap <= 3.0:
        raise ValueError(f"--poll-interval must be between 0.01 and 3 seconds, got {cap}")
    from flwr.supernode import start_client_internal as internal  # pylint: disable=import-outside-toplevel

    os.environ.setdefault(SUPEREXEC_POLL_ENV, str(cap))  # inherited by the SuperExec it spawns
    if getattr(internal, "time", None) is not time:
        logger.warning("this Flower version's SuperNode has no module-level waits to shorten; "
                       "running it with its own (3 s idle poll)")
        return False
    internal.time = ShortWaits(cap)
    return True


def main(argv: list[str] | None = None) -> None:
    """Parse ``--poll-interval``, shorten the waits, hand the rest of the arguments to Flower."""
    parser = argparse.ArgumentParser(
        prog="python -m client_app.supernode", add_help=False,
        description="flower-supernode with polling waits capped (every other argument is flower-supernode's)")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL,
                        help=f"longest wait between polls, seconds (default {DEFAULT_POLL}; Flower's idle wait is 3)")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        shorten_waits(known.poll_interval)
    except ValueError as err:
        parser.error(str(err))
    from flwr.supernode.cli.flower_supernode import flower_supernode  # pylint: disable=import-outside-toplevel

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
