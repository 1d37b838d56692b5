"""What a test's fork server runs in each forked process instead of Flower's ClientApp runtime:
it reports what the process was given (arguments, environment, folder, standard streams, parent)."""

import json
import os
import signal
import sys
import time


def report() -> None:
    """Print what this process received; ``wait`` sleeps (to be signalled), ``exit N`` exits with N."""
    line = sys.stdin.readline().strip()
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "stdin": line, "pid": os.getpid(), "ppid": os.getppid(),
                      "env": os.environ.get("FORKSERVER_TEST_VALUE"), "forked": os.environ.get("FEDRA_CLIENTAPP_FORKED"),
                      "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if "wait" in sys.argv:
        time.sleep(600)
    if "exit" in sys.argv:
        sys.exit(int(sys.argv[sys.argv.index("exit") + 1]))
