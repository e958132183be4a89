"""Messages are taken in the order they were sent, on the embedded filesystem broker too."""

from __future__ import annotations

from realfake.config import Settings
from worker.celery import enqueue_runs, enqueue_shards, make_app


def received(celery, queue: str, count: int) -> list[list]:
    args = []
    with celery.connection_for_read() as connection:
        inbox = connection.SimpleQueue(queue)
        for _ in range(count):
            message = inbox.get(timeout=5)
            args.append(message.payload[0])  # protocol 2 body: (args, kwargs, embed)
            message.ack()
        inbox.close()
    return args


def test_the_filesystem_broker_keeps_the_sending_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({"REALFAKE_HOME": str(tmp_path / "home")})
    celery = make_app(settings)
    enqueue_runs(celery, range(40))
    enqueue_shards(celery, [(7, shard) for shard in range(40)])

    assert received(celery, "train", 40) == [[run_id] for run_id in range(40)]
    assert received(celery, "score", 40) == [[7, shard] for shard in range(40)]
    assert not (tmp_path / "control").exists()  # broker state stays under REALFAKE_HOME
