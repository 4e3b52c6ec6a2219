"""``qwit run MODULE:FLOW``: run one flow, show its progress, print its result."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import click
from rich.console import Console
from rich.text import Text
from temporalio.service import RPCError

from .._client import Client
from .._errors import ArgumentsError, FlowDefinitionError, FlowIdInUse
from .._flow import Flow, compile_flow
from .._runner import Registry
from ..temporal import create_worker
from ._common import (
    EXIT_INTERRUPTED,
    Failed,
    args_option,
    connection_options,
    console,
    queue_name,
    resolve_flow,
    run_async,
    sayer,
    task_queue_option,
)
from ._connect import (
    RUN_DB,
    address_configured,
    connect,
    data_dir,
    describe_target,
    embedded_server,
    local_namespace,
)
from ._postgres import backend_module, backend_option
from ._progress import Follower, follow_run

#: Exit code after SIGTERM, as shells report it.
EXIT_TERMINATED = 143


@click.command("run")
@click.argument("flow_spec", metavar="MODULE:FLOW")
@args_option("The flow's input args: a JSON object.")
@click.option("--id", "flow_id", metavar="ID", help="The flow's id [default: <name>-<random>].")
@click.option(
    "--no-worker",
    is_flag=True,
    help="Run no worker here: one already serves the task queue (e.g. qwit dev MODULE).",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Log what the worker does, and show where the failing step raised its error.",
)
@task_queue_option
@connection_options
@backend_option
def run(
    flow_spec: str,
    args: dict[str, Any],
    flow_id: str | None,
    no_worker: bool,
    verbose: bool,
    task_queue: str | None,
    address: str | None,
    namespace: str | None,
    backend: str,
) -> None:
    """Run the flow MODULE:FLOW and wait for it to end.

    Shows each step's progress on stderr and prints the flow's final args as
    JSON on stdout. Unless --no-worker, a worker for MODULE's steps runs in
    this process. Without a Temporal address (TEMPORAL_ADDRESS, a
    TEMPORAL_PROFILE, --address), a local Temporal dev server runs for the
    duration, its state kept in $QWIT_DATA_DIR/run.db (default
    ~/.local/share/qwit), where qwit list and qwit status find the flow; then
    --no-worker is a usage error (no other worker could reach that server).

    With --backend postgres (or a Flow of backend=qwit.postgres) the flow runs
    on $QWIT_POSTGRES_DSN, else on an embedded PostgreSQL (then --no-worker
    is a usage error too); with --backend local, in this process. A Step
    whose backend= names another engine than its flow's is a usage error.

    Ctrl-C cancels the flow, which rolls it back; a second Ctrl-C stops
    waiting and leaves the flow as it is.

    Exit status: 0 the flow completed; 1 it failed (the story is on stderr);
    2 usage error.
    """
    flow, module = resolve_flow(flow_spec)
    queue = queue_name(task_queue)
    # a Flow's own backend= wins over --backend
    engine = flow.backend.name if flow.backend is not None else backend
    try:
        # checked against that engine: a Step naming another one is refused
        Client(task_queue=queue, backend=backend_module(engine)).prepare(flow, args, id=flow_id)
        Registry(flow)
    except (FlowDefinitionError, ArgumentsError) as exc:
        raise click.UsageError(str(exc)) from None
    if engine == "postgres":
        from . import _postgres

        _postgres.run(flow, args, flow_id, no_worker, verbose)
        return
    if engine == "local":
        from . import _postgres

        _postgres.run_local(flow, args, flow_id, verbose)
        return
    embedded = not address_configured(address)
    if embedded and no_worker:
        raise click.UsageError(
            "--no-worker needs the Temporal your workers use: with no address configured, "
            "qwit run starts a local server of its own, which no other worker can reach. "
            "Set TEMPORAL_ADDRESS (or --address) to your workers' server, or drop --no-worker."
        )
    err = console()
    serve = _served(flow, module, err)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    else:
        # A failing step's traceback would bury the story the progress lines tell.
        logging.getLogger("temporalio.activity").setLevel(logging.ERROR)
    request = _Request(
        flow=flow,
        serve=serve,
        args=args,
        flow_id=flow_id,
        no_worker=no_worker,
        queue=queue,
        address=address,
        namespace=namespace,
        embedded=embedded,
        verbose=verbose,
    )
    try:
        code = run_async(_run(err, request))
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    sys.exit(code)


def _served(flow: type[Flow], module: ModuleType, err: Console) -> list[Any]:
    """What the in-process worker serves: the module's Steps and Flows, with the flow's.

    A module with something else wrong in it still runs this flow.
    """
    try:
        Registry(module, flow)
    except FlowDefinitionError as exc:
        err.print(Text(f"qwit: serving only {flow.name!r}'s steps: {exc}", style="yellow"))
        return [flow]
    return [module, flow]


@dataclass(frozen=True)
class _Request:
    """What ``qwit run`` was asked to do, its options checked.

    Attributes:
        flow: The flow to run.
        serve: What the in-process worker serves (see ``_served``).
        args: The flow's input args.
        flow_id: Its id, if given.
        no_worker: Run no worker here: one already serves the task queue.
        queue: The task queue.
        address: The Temporal address given (None: from the environment).
        namespace: The namespace given.
        embedded: No address configured: run on a local dev server of our own.
        verbose: Log what the worker does; show where a failing step raised.
    """

    flow: type[Flow]
    serve: list[Any]
    args: dict[str, Any]
    flow_id: str | None
    no_worker: bool
    queue: str
    address: str | None
    namespace: str | None
    embedded: bool
    verbose: bool


async def _run(err: Console, request: _Request) -> int:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    # SIGTERM must still stop the worker and the dev server we started.
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        return await _run_flow(err, request)
    except asyncio.CancelledError:
        err.print(Text("qwit: terminated", style="yellow"))
        return EXIT_TERMINATED
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _run_flow(err: Console, request: _Request) -> int:
    say = sayer(err)
    flow, queue = request.flow, request.queue
    async with AsyncExitStack() as stack:
        react = "qwit react"
        if request.embedded:
            ns = local_namespace(request.namespace)
            server = await stack.enter_async_context(embedded_server(ns, say))
            # Only this server's own settings: env TLS or API keys are for other clusters.
            temporal = await connect(server.address, ns, tls=False, api_key=None)
            where = f"{server.address} (local dev server)"
            react = f"TEMPORAL_ADDRESS={server.address} qwit react"
        else:
            temporal = await connect(request.address, request.namespace)
            where = describe_target(request.address)
        client = Client(temporal_client=temporal, task_queue=queue)
        starting = asyncio.ensure_future(client.start(flow, request.args, id=request.flow_id))
        if not request.no_worker:
            # The worker starts polling while the flow's start is on its way.
            # On a shared server this short-lived worker must not keep flows
            # sticky to itself: once it exits, other runs' flows it had cached
            # would stall until Temporal's sticky timeout (10 s) sends them on.
            options: dict[str, Any] = {} if request.embedded else {"max_cached_workflows": 0}
            worker = create_worker(temporal, *request.serve, task_queue=queue, **options)
            try:
                await stack.enter_async_context(worker)
            except BaseException:
                starting.cancel()
                raise
        try:
            handle = await starting
        except FlowIdInUse as exc:  # the request failed; its args were fine
            raise Failed(str(exc)) from None
        except (FlowDefinitionError, ArgumentsError) as exc:
            raise click.UsageError(str(exc)) from None
        except RPCError as exc:
            raise Failed(f"starting the flow failed: {exc.message}") from None
        say(f"flow {flow.name!r}, id {handle.id}, on Temporal at {where}, task queue {queue!r}")
        hint = ""
        if request.no_worker:
            hint = (
                f"qwit: no worker has answered yet: is one serving task queue {queue!r} "
                "(qwit worker MODULE, or qwit dev MODULE)?"
            )
        follower = Follower(err, react=react, no_worker_hint=hint)
        follower.expect(compile_flow(flow))
        kept = f" in {data_dir() / RUN_DB}" if request.embedded else " in Temporal"
        return await follow_run(
            err, say, handle, follower, flow=flow.name, kept=kept, verbose=request.verbose
        )
