"""realfake-worker: a Celery worker pinned to one GPU.

CUDA_VISIBLE_DEVICES is set before anything imports torch, and the parent process never
touches CUDA: only the pool's child process that runs a task does.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Optional

import typer

cli = typer.Typer(add_completion=False)


@cli.command()
def run(
    gpu: Annotated[Optional[int], typer.Option(help="GPU index to pin this worker to")] = None,
    queues: Annotated[str, typer.Option(help="comma-separated queues to consume")] = "train,score",
    concurrency: Annotated[int, typer.Option(min=1, help="tasks at once (one per GPU is right for training)")] = 1,
    name: Annotated[Optional[str], typer.Option(help="worker name (default: gpuN@host or cpu@host)")] = None,
    loglevel: Annotated[str, typer.Option(help="log level")] = "INFO",
) -> None:
    """Start a worker consuming the train and score queues."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    unknown = set(queues.split(",")) - {"train", "score"}
    if unknown:
        raise typer.BadParameter(f"unknown queue(s) {sorted(unknown)}; use train and/or score", param_hint="--queues")
    host = socket.gethostname()
    name = name or f"{'cpu' if gpu is None else f'gpu{gpu}'}@{host}"
    # torch threads: share the cores among the pool's processes
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // concurrency)))
    # idle torch threads sleep instead of spinning: scoring's decoding threads share the cores
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from realfake.errors import SettingsError

    try:
        from worker.celery import app  # imported only now, after CUDA_VISIBLE_DEVICES
    except SettingsError as error:  # a REALFAKE_* variable it cannot use: said, not a traceback
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None

    app.worker_main(
        ["worker", "-Q", queues, "-c", str(concurrency), "-n", name, "-E", "-l", loglevel,
         "--prefetch-multiplier=1", "-P", "prefork"]
    )


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
