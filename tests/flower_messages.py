"""Test support for building real Flower messages without a transport."""

from collections.abc import Iterable, Iterator

import pytest
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class StaticGrid(Grid):
    """A grid whose nodes are fixed and already known; these tests never transport messages."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def _no_transport(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("this test grid carries no messages")

    set_run = create_message = send_and_receive = push_messages = pull_messages = _no_transport
    run = property(_no_transport)  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def run_identity() -> Iterator[None]:
    """Messages are stamped with the run, node and task of the process: give them one."""
    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous
