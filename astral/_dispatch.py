"""Capabilities and the standalone dispatcher, :func:`handle`.

A capability is one of:

* an object with an async ``call(input)`` method (the structural
  :class:`Callable` protocol of the original);
* an ``async def f(input)`` function;
* an async generator function ``async def f(input): yield ...`` (streams).

A ``call`` (or function) that *returns* an async iterable streams too, as in
the original. A capability with a second positional parameter takes an *input stream*:
it is called as ``f(input, items)``, ``items`` an async iterator of what the
caller streams to it (feature ``input-stream``; empty when the caller
streams nothing). A capability whose input is annotated with a msgspec
``Struct``, a pydantic model, a ``TypedDict`` or a dataclass has its input
validated on the way in (see :mod:`astral._validation`). Capabilities are
resolved once, when registered; at dispatch
time the remote name is only ever a key into a private ``dict``, so no
attribute lookup is ever driven by the wire.

This module does no I/O.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Mapping
from collections.abc import Callable as _Fn
from contextlib import aclosing
from typing import Any, Never, Protocol, TypeAlias, runtime_checkable

from ._exceptions import Failure
from ._frames import Call, Result, Yield
from ._validation import adapt

__all__ = [
    "GENERIC_MESSAGE",
    "INTERNAL",
    "UNKNOWN_CAPABILITY",
    "Callable",
    "Capabilities",
    "Capability",
    "Dispatch",
    "OnError",
    "Resolved",
    "error_message",
    "error_result",
    "handle",
    "resolve",
    "takes_items",
]

# The input stream of the call being served in this context, for
# capabilities that take one (set by the driver just before it runs them).
input_items: contextvars.ContextVar[AsyncIterator[Any]] = contextvars.ContextVar(
    "astral.input_items"
)

#: The error string for a name that is not registered (as in the original).
UNKNOWN_CAPABILITY = "unknown capability"


@runtime_checkable
class Callable(Protocol):
    """Anything with an async ``call(input)`` method is a capability.

    ``call`` returns the output (any JSON value), or an async iterable whose
    items are streamed to the caller.
    """

    def call(self, input: Any, /) -> Awaitable[Any]:
        """Run the capability on ``input`` and return its output."""
        ...


class _StreamingCallable(Protocol):
    """An object whose ``call(input)`` is an async generator: it streams."""

    def call(self, input: Any, /) -> AsyncIterable[Any]: ...


#: What a ``capabilities`` mapping holds, for type checkers: an async
#: function or async generator function of one argument (whatever its input
#: type) or of two (the input and an input stream), or an object with an
#: async ``call(input)``. A sync function, or a
#: lambda returning a plain value, is refused by mypy as it is at run time.
Capability: TypeAlias = (
    Callable
    | _StreamingCallable
    | _Fn[[Never], Awaitable[object]]
    | _Fn[[Never], AsyncIterable[object]]
    # (input, items): takes an input stream
    | _Fn[[Never, Never], Awaitable[object]]
    | _Fn[[Never, Never], AsyncIterable[object]]
)
Capabilities: TypeAlias = Mapping[str, Capability]
#: A resolved capability: ``input -> awaitable output | async iterable``.
_Invoke: TypeAlias = _Fn[[Any], Any]
#: What :func:`handle` returns.
Dispatch: TypeAlias = _Fn[[Call], AsyncIterator[Yield | Result]]


class Resolved(dict[str, _Invoke]):
    """A table :func:`resolve` made: resolving it again returns it as it is.

    A server resolves its capabilities once and hands every connection the
    same table, instead of a new one (wrappers, validation plans) each.
    Nothing changes it once made.
    """

    __slots__ = ()


def resolve(capabilities: Capabilities | None) -> Resolved:
    """Check every capability once and return a private name → invoker table.

    Args:
        capabilities: Names mapped to capabilities, or ``None`` for none.

    Returns:
        A new table: later changes to ``capabilities`` have no effect. A
        table this function made is returned as it is.

    Raises:
        TypeError: If a name is not a string, or a value is not an async
            function, an async generator function or an object with an async
            ``call`` method, or its input is annotated with a ``TypedDict`` or
            a dataclass while neither msgspec nor pydantic is installed.
    """
    if type(capabilities) is Resolved:
        return capabilities
    table = Resolved()
    for name, capability in (capabilities or {}).items():
        if not isinstance(name, str):
            raise TypeError(f"capability names must be strings, not {type(name).__name__}")
        table[name] = _invoker(name, capability)
    return table


def _is_async(function: Any) -> bool:
    # Also true for a functools.partial of an async function.
    return inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)


def _invoker(name: str, capability: Any) -> _Invoke:
    if _is_async(capability):
        return _adapt(name, capability)
    # Looked up on the type, as Python looks up special methods, so a
    # __getattr__ cannot pass for an async method.
    if _is_async(getattr(type(capability), "call", None)):
        return _adapt(name, capability.call)
    if (
        callable(capability)
        and not inspect.isroutine(capability)
        and _is_async(type(capability).__call__)
    ):
        return _adapt(name, capability)
    # Anything else, a plain sync function above all, would only fail when the
    # remote first calls it: refuse it now.
    raise TypeError(
        f"capability {name!r} must be an async function, an async generator function "
        f"or an object with an async 'call' method, not {type(capability).__name__}"
    )


def takes_items(invoke: _Invoke) -> bool:
    """Whether a resolved capability takes an input stream (a second parameter)."""
    return getattr(invoke, "_astral_takes_items", False) is True


def _wants_items(function: Any) -> bool:
    """Whether ``function`` has a second positional parameter without a default.

    Such a function could not be called with the input alone, so no
    capability that worked before input streams changes meaning.
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in signature.parameters.values() if p.kind in kinds]
    return len(positional) >= 2 and positional[1].default is inspect.Parameter.empty


async def _no_items() -> AsyncIterator[Any]:
    return
    yield  # an async generator that yields nothing


def _with_items(function: Any) -> _Invoke:
    """``function(input, items)`` as an invoker of one argument."""

    @functools.wraps(function)  # validation reads the annotations through __wrapped__
    def invoke(input: Any) -> Any:
        return function(input, input_items.get(None) or _no_items())

    invoke._astral_takes_items = True  # type: ignore[attr-defined]
    return invoke


def _adapt(name: str, invoke: _Invoke) -> _Invoke:
    if _wants_items(invoke):
        invoke = _with_items(invoke)
    try:
        adapted = adapt(invoke)
    except TypeError as exc:
        raise TypeError(f"capability {name!r}: {exc}") from None
    if adapted is not invoke and takes_items(invoke):
        adapted._astral_takes_items = True  # type: ignore[attr-defined]
    return adapted


def error_message(exc: BaseException) -> str:
    """The error string sent for a failed capability: its message, never a traceback."""
    message = str(exc)
    return message if message else type(exc).__name__


#: The error code sent for an exception other than :class:`~astral.Failure`.
INTERNAL = "internal"
#: The message sent instead of an unexpected exception's own, on request.
GENERIC_MESSAGE = "internal error"


def error_result(call: Call, exc: Exception, *, hide_internal_errors: bool = False) -> Result:
    """The error result for a capability that raised ``exc``.

    A :class:`~astral.Failure` sends its message, code and data; anything
    else its message (or :data:`GENERIC_MESSAGE` when hiding) and code
    ``"internal"``.
    """
    if isinstance(exc, Failure):
        return Result(call.id, error=exc.message, code=exc.code, data=exc.data)
    message = GENERIC_MESSAGE if hide_internal_errors else error_message(exc)
    return Result(call.id, error=message, code=INTERNAL)


#: Turns a capability's exception into its error result (and may log it).
OnError: TypeAlias = _Fn[[Call, Exception], Result]


async def start(
    invoke: _Invoke, call: Call, on_error: OnError = error_result
) -> Result | AsyncIterator[Any]:
    """Run a capability up to its output.

    Returns:
        The terminal :class:`Result` of a single-result call (its output, or
        its error when it raised an :class:`Exception`), or the async iterator
        of a streaming one, to be drained with :func:`stream`.

    Cancellation and other ``BaseException`` propagate.
    """
    try:
        output = invoke(call.input)
        if inspect.isawaitable(output):
            output = await output
        elif not isinstance(output, AsyncIterable):
            raise TypeError(f"capability returned {type(output).__name__}, not an awaitable")
    except Exception as exc:  # noqa: BLE001 - a capability's failure becomes its error result
        return on_error(call, exc)
    if isinstance(output, AsyncIterable):
        return aiter(output)
    return Result(call.id, output)


async def stream(
    call: Call, iterator: AsyncIterator[Any], on_error: OnError = error_result
) -> AsyncGenerator[Yield | Result, None]:
    """Drain a streaming capability: ``Yield`` frames, then exactly one ``Result``.

    A stream that fails part-way ends with the error result; the iterator is
    closed however this generator ends.
    """
    call_id = call.id
    try:
        while True:
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                break
            except Exception as exc:  # noqa: BLE001 - a stream failing part-way
                yield on_error(call, exc)
                return
            yield Yield(call_id, item)
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
    yield Result(call_id)


async def run(invoke: _Invoke, call: Call) -> AsyncGenerator[Yield | Result, None]:
    """Run one resolved capability: ``Yield`` frames, then exactly one ``Result``.

    Only :class:`Exception` becomes an error result; cancellation and other
    ``BaseException`` propagate.
    """
    first = await start(invoke, call)
    if isinstance(first, Result):
        yield first
        return
    async with aclosing(stream(call, first)) as frames:
        async for frame in frames:
            yield frame


def handle(capabilities: Capabilities) -> Dispatch:
    """Create the original's standalone dispatcher.

    ``dispatch(call)`` is an async iterator of :class:`Yield` frames and then
    exactly one :class:`Result`::

        dispatch = astral.handle({"echo": echo})
        async for frame in dispatch(astral.Call("1", "echo", "hi")):
            ...

    Only registered names dispatch; anything else, including ``"__class__"``,
    ``"call"`` and ``""``, yields ``Result(error="unknown capability")``.

    Args:
        capabilities: Names mapped to capabilities (see :class:`Callable`).

    Returns:
        The dispatch function.

    Raises:
        TypeError: If a capability is not async (see :func:`resolve`).
    """
    table = resolve(capabilities)

    async def dispatch(call: Call) -> AsyncIterator[Yield | Result]:
        invoke = table.get(call.capability)
        if invoke is None:
            yield Result(call.id, error=UNKNOWN_CAPABILITY)
            return
        async with aclosing(run(invoke, call)) as frames:
            async for frame in frames:
                yield frame

    return dispatch
