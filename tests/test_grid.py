"""The deployed run's grid: replies collected as they arrive, with a wait that grows to 0.5 s."""

from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from flower_messages import StaticGrid, run_identity  # noqa: F401 - autouse fixture
from server_app import grid as grid_module
from server_app.grid import PromptGrid


class QueuedReplies(StaticGrid):
    """A grid whose node ``i`` replies on the ``arrives[i]``-th pull (a transport that takes its time)."""

    def __init__(self, arrives: list[int]) -> None:
        super().__init__(list(range(1, len(arrives) + 1)))
        self.arrives, self.pulled, self.sent = arrives, 0, []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.sent = list(messages)
        for i, message in enumerate(self.sent):
            message.metadata.__dict__["_message_id"] = f"m{i}"
        return [m.metadata.message_id for m in self.sent]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulled += 1
        wanted = set(message_ids)
        return [Message(RecordDict({"config": ConfigRecord({"i": i})}), reply_to=m)
                for i, m in enumerate(self.sent)
                if self.arrives[i] == self.pulled and m.metadata.message_id in wanted]


def _messages(count: int) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=i + 1, message_type="train")
            for i in range(count)]


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses between pulls, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(grid_module.time, "sleep", recorded.append)
    return recorded


def test_every_reply_is_collected_with_short_then_growing_waits(waits: list[float]) -> None:
    transport = QueuedReplies([1, 3, 30])
    grid = PromptGrid(transport)
    replies = list(grid.send_and_receive(_messages(3), timeout=None))
    assert sorted(r.content["config"]["i"] for r in replies) == [0, 1, 2]
    assert transport.pulled == 30 and grid.pulls == 30  # no pull after the last reply
    assert waits[0] == pytest.approx(0.1) and all(b >= a for a, b in zip(waits, waits[1:]))
    assert max(waits) == pytest.approx(grid_module.MAX_WAIT) == 0.5  # at most every 0.5 s on a long round


def test_a_timeout_returns_the_replies_that_arrived(waits: list[float]) -> None:
    transport = QueuedReplies([1, 10 ** 6])
    replies = list(PromptGrid(transport).send_and_receive(_messages(2), timeout=0.0))
    assert [r.content["config"]["i"] for r in replies] == [0] and transport.pulled == 1
