"""Waits between polls that are short only when an answer is likely.

Flower's deployment is poll-based: the ServerApp asks the SuperLink for replies.
Polling often costs requests (and CPU, on a host the nodes share), polling rarely costs
latency. Exchanges of the same kind take about as long as the last one, so a poller that
remembers that time (``expected``) polls every ``near_wait`` seconds only in a window
around it and keeps its usual ``wait`` elsewhere; a wrong guess costs a few requests,
never a missed answer. The deployed ServerApp's grid polls so (``server_app/grid.py``).
The same schedule in the idle SuperNodes was measured and dropped: their windows fall
while the server aggregates and evaluates, and their requests slowed that down more than
they saved (docs/PERFORMANCE.md, section 8).
"""

NEAR_FROM, NEAR_UNTIL = 0.8, 1.3  # the window, as fractions of the expected time


def next_pause(elapsed: float, wait: float, expected: float | None, near_wait: float) -> float:
    """Seconds to sleep before the next poll, ``elapsed`` seconds into a wait expected to take ``expected``.

    ``wait`` outside the window ``[0.8, 1.3] x expected`` (or with nothing expected), ``near_wait``
    inside it; a pause before the window ends where it starts, never shorter than ``near_wait``."""
    if expected is None or elapsed >= NEAR_UNTIL * expected:
        return wait
    start = NEAR_FROM * expected
    if elapsed >= start:
        return near_wait
    return max(min(wait, start - elapsed), near_wait)
