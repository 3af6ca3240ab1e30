"""``astral.run_worker``: a worker that keeps itself connected, for months.

One call runs the whole life of a worker: connect (with a fresh token each
time), serve the principal and run ``on_connect``, and when the connection
ends, connect again after a pause chosen by :class:`Backoff`.

Why not ``async for peer in astral.connect(...)`` (as in websockets)? A peer
runs its tasks in a task group that must be left in the task and the order it
was entered. An iterator cannot know when the body of an ``async for`` leaves
by ``break`` or an exception, so the peer of that iteration would be left
open, its task group entered and never exited: structured concurrency
forbids it (trio says so loudly). A function that owns the loop, and calls
``on_connect`` for each connection, keeps every task inside one ``await``.

Why a backoff of our own rather than stamina (or tenacity under it)? Both run
on asyncio and trio, but they retry a block *until it succeeds*, with additive
jitter (``wait_exp_base ** n + uniform(0, wait_jitter)``). A worker needs the
opposite cycle: success (a connection that lived long enough) resets the
schedule, failures never end it, and the pause is drawn with full jitter
(``uniform(0, min(maximum, initial * multiplier ** n))``) so that a fleet of
workers does not come back in step after a principal restart. That is ten
lines, and two fewer dependencies for every worker.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import anyio

from ._client import connect
from ._exceptions import ConnectError, ConnectionClosed, HandshakeError, Unauthorized
from ._principal import TOKEN_EXPIRED_CODE
from ._ws_client import redact

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._dispatch import Capabilities
    from ._peer import Peer

__all__ = ["Backoff", "run_worker"]

logger = logging.getLogger("astral.worker")

#: HTTP refusals worth another try: a refused token (it may be renewed), a
#: request timeout, too many requests. Any other 4xx means the URL is wrong.
_RETRY_4XX = frozenset({401, 408, 429})
#: A session ended by its token's expiry is followed at once by a new one, if
#: it lasted this long: a token function handing out stale tokens must not
#: make a worker reconnect in a tight loop.
_EXPIRED_AT_ONCE_AFTER = 1.0


@dataclass(frozen=True)
class Backoff:
    """How long :func:`run_worker` waits before connecting again.

    The pause before attempt ``n`` (counting failures since the last good
    connection, from 0) is drawn uniformly from
    ``[0, min(maximum, initial * multiplier ** n)]`` ("full jitter"). A
    connection that stayed open at least ``reset_after`` seconds starts the
    count again at 0.

    Args:
        initial: Upper bound of the first pause, in seconds.
        maximum: Upper bound of any pause, in seconds.
        multiplier: How much the bound grows with each failure.
        reset_after: Seconds a connection must last to count as good.

    Raises:
        ValueError: A bound is not positive, ``maximum < initial``,
            ``multiplier < 1`` or ``reset_after`` is negative.
    """

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    reset_after: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("Backoff needs 0 < initial <= maximum")
        if not self.multiplier >= 1:
            raise ValueError("Backoff multiplier must be at least 1")
        if not self.reset_after >= 0:
            raise ValueError("Backoff reset_after must not be negative")

    def ceiling(self, attempt: int) -> float:
        """The largest pause before attempt ``attempt`` (0 after a good connection)."""
        if attempt >= 1024:  # multiplier ** attempt would overflow a float
            return self.maximum if self.multiplier > 1 else self.initial
        return min(self.maximum, self.initial * self.multiplier**attempt)

    def delay(self, attempt: int, *, rand: Callable[[], float] = random.random) -> float:
        """Draw the pause before attempt ``attempt``, in seconds.

        Args:
            attempt: Failures since the last good connection (0 for none).
            rand: Returns a float in ``[0, 1)``; for tests.
        """
        return rand() * self.ceiling(attempt)


async def run_worker(
    url: str,
    *,
    token: str | Callable[[], str | Awaitable[str]] | None = None,
    capabilities: Capabilities | None = None,
    on_connect: Callable[[Peer], Awaitable[None]] | None = None,
    backoff: Backoff | None = None,
    grace: float = 0.0,
    **options: Any,
) -> NoReturn:
    """Run a worker that reconnects to its principal whenever the connection ends.

    Runs until cancelled (or a fatal error)::

        async def work(peer: astral.Peer) -> None:
            while True:
                job = await peer.call("next_job", timeout=None)
                ...

        await astral.run_worker(
            "wss://principal.example/astral",
            token=lambda: astral.mint_token(secret, subject="worker-1"),
            capabilities={"bash": bash},
            on_connect=work,
        )

    Each attempt calls ``token`` afresh. After each connection ends, or an
    attempt fails, it waits as :class:`Backoff` says, except after a
    connection (of a second or more) the principal closed because its token
    expired (close code 4401): then it connects again at once with a fresh
    token. Refusals:

    * HTTP 401 (token refused): retried with backoff, logged at WARNING each
      time, since a renewed token may pass;
    * HTTP 408, 429, 5xx, no answer, network and TLS errors: retried;
    * any other HTTP 4xx (the URL is wrong): raised.

    Args:
        url: ``ws://`` or ``wss://`` URL of the principal.
        token: The JWT, or a sync or async function returning a fresh one
            (called for every attempt).
        capabilities: What this worker lets the principal call.
        on_connect: Awaited with each new peer, for a worker that also makes
            calls. When it returns, the worker keeps serving until the
            connection ends. If it raises :class:`ConnectionClosed` because
            that connection ended, the worker reconnects; any other exception
            ends :func:`run_worker` with it.
        backoff: The reconnection schedule; ``Backoff()`` by default.
        grace: On cancellation, seconds the calls in flight may take to
            finish (new calls are refused with ``"shutting down"``) before
            the connection closes with 1001; ``0`` stops at once.
        **options: Passed to :func:`astral.connect` (``ssl``, ``headers``,
            ``token_in_query``, ``timeout``, ``open_timeout``,
            ``ping_interval``, ``ping_timeout``, ``max_message_size``...).

    Raises:
        HandshakeError: The principal refused the upgrade with a 4xx other
            than 401, 408 and 429.
        ValueError: An option is out of range.
        TypeError: A capability is not async, or the token function returned
            something other than a string.
    """
    if not grace >= 0:
        raise ValueError("grace must not be negative")
    schedule = backoff or Backoff()
    where = redact(url)
    attempt = 0
    while True:
        try:
            lived, closed = await _session(
                url=url,
                token=token,
                capabilities=capabilities,
                on_connect=on_connect,
                grace=grace,
                where=where,
                options=options,
            )
        except Unauthorized as exc:
            logger.warning("%s refused the worker's token: %s", where, exc)
        except HandshakeError as exc:
            status = exc.status
            if status is not None and 400 <= status < 500 and status not in _RETRY_4XX:
                raise
            logger.warning("%s refused the connection: %s", where, exc)
        except ConnectError as exc:
            logger.warning("cannot connect to %s: %s", where, exc)
        else:
            if closed.code == TOKEN_EXPIRED_CODE and lived >= _EXPIRED_AT_ONCE_AFTER:
                logger.info("token expired; connecting again to %s at once", where)
                attempt = 0
                continue
            if lived >= schedule.reset_after:
                attempt = 0
        pause = schedule.delay(attempt)
        attempt += 1
        logger.info("connecting again to %s in %.2f s", where, pause)
        await anyio.sleep(pause)


async def _session(
    *,
    url: str,
    token: Any,
    capabilities: Capabilities | None,
    on_connect: Callable[[Peer], Awaitable[None]] | None,
    grace: float,
    where: str,
    options: dict[str, Any],
) -> tuple[float, ConnectionClosed]:
    """One connection, from connecting to its end: how long it lived, and why it ended.

    The connection runs in a task shielded from cancellation, so that when
    the worker is cancelled its calls in flight can finish (:meth:`Peer.drain`);
    a connection still being opened is cancelled at once.
    """
    shield = anyio.CancelScope(shield=True)
    running: list[Peer] = []
    outcome: list[tuple[float, ConnectionClosed]] = []
    done = anyio.Event()

    async def run() -> None:
        try:
            with shield:
                outcome.append(
                    await _connection(
                        url=url,
                        token=token,
                        capabilities=capabilities,
                        on_connect=on_connect,
                        where=where,
                        running=running,
                        options=options,
                    )
                )
        finally:
            done.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            try:
                await done.wait()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    if running and not running[0].closed:
                        await running[0].drain(grace)
                    shield.cancel()
                raise
    except BaseExceptionGroup as group:
        # The task's own error, as it was raised (a cancellation is not grouped).
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    return outcome[0]


async def _connection(
    *,
    url: str,
    token: Any,
    capabilities: Capabilities | None,
    on_connect: Callable[[Peer], Awaitable[None]] | None,
    where: str,
    running: list[Peer],
    options: dict[str, Any],
) -> tuple[float, ConnectionClosed]:
    async with connect(url, token=token, capabilities=capabilities, **options) as peer:
        running.append(peer)
        started = anyio.current_time()
        logger.info("connected to %s", where)
        try:
            if on_connect is not None:
                await on_connect(peer)
            closed = await peer.wait_closed()
        except Exception as exc:
            # on_connect failed because this connection ended, or is being
            # drained (the worker is stopping: its calls are refused with
            # "shutting down" before the peer is closed): connect again.
            if not ((peer.closed or peer._state.draining) and _only_closed(exc)):
                raise
            closed = await peer.wait_closed()
        logger.info("connection to %s ended: %s", where, closed)
        return anyio.current_time() - started, closed


def _only_closed(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(ConnectionClosed)[1] is None
    return isinstance(exc, ConnectionClosed)
