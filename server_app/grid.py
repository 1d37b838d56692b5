"""A deployed run's grid that collects replies as they arrive instead of every 3 seconds.

Flower 1.41's deployment grid pushes a round's messages, then asks the SuperLink for
replies every 3 seconds: a round ends on average 1.5 s (at worst 3 s) after its last
reply arrived, in every exchange (capacity query, training, the nodes' evaluation).
``PromptGrid`` wraps it and polls quickly at first, backing off to every 0.25 s on a long
round, so a reply is collected within a fraction of a second of arriving without asking
the SuperLink (beside the ServerApp) more than a few times per second. It also remembers
how long the last exchange of each kind (training, evaluation, ...) took to its last
reply, and polls every 0.05 s from a little before that time until a little after: a
round's last reply is collected within about 0.05 s of arriving instead of 0.125 s on
average, at the cost of a few more pulls near the expected end. A wrong guess costs
nothing but those pulls: outside that window the growing wait applies.

Flower's ServerApp, finding a reply whose parts the node has not finished pushing to
the SuperLink, waits 1 s, 2 s, ... before asking for them again; a deployed ServerApp
asks again after 0.02 s, doubling up to 0.2 s (``client_app.forkserver.prompt_pulls``,
as the ClientApps do). That wait had cost 1-2 s in about one round of three.

It also packs every message's arrays into one array (``fedra_core.wire.pack``): Flower
sends each array of a record as its own object, one request each between a SuperNode
and the SuperLink, and a task of 75 arrays took seconds each way through the TLS proxy.
A node replies packed to a packed task; the server reads packed and unpacked replies alike.
"""

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid

from client_app.forkserver import prompt_pulls
from fedra_core.polling import next_pause
from fedra_core.wire import PACKED, PACKED_STYPE, is_packed, pack

FIRST_WAIT = 0.1  # seconds between the first pulls
MAX_WAIT = 0.25  # the slowest this grid polls (Flower's own interval is 3 s)
BACKOFF = 1.25
NEAR_WAIT = 0.05  # between pulls near the time the last exchange of the same kind ended


class PromptGrid(Grid):
    """Every call goes to ``grid``; ``send_and_receive`` pulls replies with a short, growing wait."""

    def __init__(self, grid: Grid, first_wait: float = FIRST_WAIT, max_wait: float = MAX_WAIT) -> None:
        prompt_pulls()  # this process's pulls of a reply's parts: again after 0.02 s, not 1 s
        self._grid = grid
        self.first_wait, self.max_wait = first_wait, max_wait
        self.pulls = 0  # pull requests made, for tests and logs
        self.last_seconds: dict[str, float] = {}  # per message type: push to last reply, last exchange

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            if message.has_content() and "arrays" in message.content.array_records:
                message.content["arrays"] = packed_record(message.content.array_records["arrays"])
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then collect their replies until all arrived or ``timeout`` seconds passed."""
        messages = list(messages)
        kind = ",".join(sorted({m.metadata.message_type for m in messages}))
        expected = self.last_seconds.get(kind)
        start = time.monotonic()
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else start + timeout
        replies: list[Message] = []
        wait = self.first_wait
        while pending:
            arrived = list(self.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
            now = time.monotonic()
            if not pending:
                self.last_seconds[kind] = now - start
                break
            if deadline is not None and now >= deadline:
                break
            pause = next_pause(now - start, wait, expected, NEAR_WAIT)
            time.sleep(pause if deadline is None else min(pause, max(deadline - now, 0.0)))
            wait = min(wait * BACKOFF, self.max_wait)
        return replies


def packed_record(record: ArrayRecord) -> ArrayRecord:
    """``record``'s arrays packed into one array (a record already packed is returned as it is)."""
    if is_packed(record):
        return record
    blob = pack([(k, a.dtype, tuple(a.shape), a.stype, a.data) for k, a in record.items()])
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)})
