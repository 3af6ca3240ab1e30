"""The standalone dispatcher, astral.handle: the original's tests, in Python terms."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import pytest

import astral
from astral import Call, Result, Yield, handle
from astral._dispatch import resolve

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator


async def collect(dispatch: astral._dispatch.Dispatch, call: Call) -> list[Yield | Result]:
    return [frame async for frame in dispatch(call)]


async def echo(input: Any) -> Any:
    return input


async def collect_into(items: AsyncIterable[Any], into: list[Any]) -> None:
    """Append each item as it arrives, so a test sees what came before an error."""
    async for item in items:
        into.append(item)  # noqa: PERF401 - the items before an error must be kept


async def count(input: int) -> AsyncIterator[int]:
    for i in range(input):
        yield i


class Echo:
    """The original's structural Callable: an object with an async ``call``."""

    def __init__(self) -> None:
        self.inputs: list[Any] = []

    async def call(self, input: Any) -> Any:
        self.inputs.append(input)
        return {"echo": input}


class StreamingCallable:
    """A ``call`` that returns an async iterable, as the original's streaming callables do."""

    async def call(self, input: int) -> AsyncIterator[int]:
        return count(input)


class GeneratorMethod:
    async def call(self, input: str) -> AsyncIterator[str]:
        for char in input:
            yield char


class AsyncCallableObject:
    async def __call__(self, input: Any) -> Any:
        return ["called", input]


# -- dispatching to what was registered -------------------------------------


async def test_dispatch_to_an_object_with_async_call() -> None:
    capability = Echo()
    frames = await collect(handle({"echo": capability}), Call("1", "echo", {"x": 1}))
    assert frames == [Result("1", {"echo": {"x": 1}})]
    assert capability.inputs == [{"x": 1}]


async def test_dispatch_to_an_async_function() -> None:
    frames = await collect(handle({"echo": echo}), Call("1", "echo", [1, "two"]))
    assert frames == [Result("1", [1, "two"])]


async def test_dispatch_to_an_async_generator_function() -> None:
    frames = await collect(handle({"count": count}), Call("c", "count", 3))
    assert frames == [Yield("c", 0), Yield("c", 1), Yield("c", 2), Result("c")]


async def test_dispatch_to_a_call_returning_an_async_iterable() -> None:
    frames = await collect(handle({"count": StreamingCallable()}), Call("s", "count", 2))
    assert frames == [Yield("s", 0), Yield("s", 1), Result("s")]


async def test_dispatch_to_an_async_generator_method() -> None:
    # (Accepted at run time, though astral.Callable types ``call`` as returning an Awaitable.)
    dispatch = handle({"chars": GeneratorMethod()})  # type: ignore[dict-item]
    frames = await collect(dispatch, Call("g", "chars", "ab"))
    assert frames == [Yield("g", "a"), Yield("g", "b"), Result("g")]


async def test_dispatch_to_an_async_function_returning_an_async_iterable() -> None:
    async def make_stream(input: int) -> AsyncIterator[int]:
        return count(input)

    frames = await collect(handle({"s": make_stream}), Call("s", "s", 1))
    assert frames == [Yield("s", 0), Result("s")]


async def test_dispatch_to_a_partial_and_a_callable_object() -> None:
    async def add(a: int, b: int) -> int:
        return a + b

    dispatch = handle({"add2": functools.partial(add, 2), "obj": AsyncCallableObject()})
    assert await collect(dispatch, Call("1", "add2", 3)) == [Result("1", 5)]
    assert await collect(dispatch, Call("2", "obj", 7)) == [Result("2", ["called", 7])]


async def test_dispatch_passes_none_when_input_is_absent() -> None:
    frames = await collect(handle({"echo": echo}), Call("1", "echo"))
    assert frames == [Result("1")]


async def test_dispatch_picks_the_named_capability_among_many() -> None:
    async def one(_: Any) -> int:
        return 1

    async def two(_: Any) -> int:
        return 2

    dispatch = handle({"one": one, "two": two})
    assert await collect(dispatch, Call("a", "two")) == [Result("a", 2)]
    assert await collect(dispatch, Call("b", "one")) == [Result("b", 1)]


# -- unknown capabilities ------------------------------------------------------

HOSTILE_NAMES = [
    "__proto__",
    "constructor",
    "toString",
    "__class__",
    "__init__",
    "__dict__",
    "call",
    "",
    "__getattribute__",
    "__getitem__",
    "keys",
    "get",
    "items",
    "missing",
    "echo ",
    "ECHO",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_unknown_capability(name: str) -> None:
    dispatch = handle({"echo": Echo(), "count": count})
    frames = await collect(dispatch, Call("u", name, "x"))
    assert frames == [Result("u", error="unknown capability")]


async def test_unknown_capability_with_nothing_registered() -> None:
    assert await collect(handle({}), Call("1", "anything")) == [
        Result("1", error="unknown capability")
    ]


class Booby(dict[str, Any]):
    """A mapping whose attribute and item lookups explode once armed."""

    armed = False

    def __getattr__(self, name: str) -> NoReturn:
        raise AssertionError(f"attribute lookup {name!r} driven by the wire")

    def __getitem__(self, key: str) -> Any:
        if type(self).armed:
            raise AssertionError(f"item lookup {key!r} driven by the wire")
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if type(self).armed:
            raise AssertionError(f"get({key!r}) driven by the wire")
        return super().get(key, default)


async def test_dispatch_never_looks_names_up_in_the_given_mapping() -> None:
    capabilities = Booby(echo=echo)
    dispatch = handle(capabilities)
    Booby.armed = True
    try:
        for name in [*HOSTILE_NAMES, "armed"]:
            if name == "echo":
                continue
            frames = await collect(dispatch, Call("1", name))
            assert frames == [Result("1", error="unknown capability")]
        assert await collect(dispatch, Call("2", "echo", 5)) == [Result("2", 5)]
    finally:
        Booby.armed = False


async def test_later_changes_to_the_mapping_have_no_effect() -> None:
    capabilities: dict[str, Any] = {"echo": echo}
    dispatch = handle(capabilities)
    capabilities["late"] = echo
    del capabilities["echo"]
    assert await collect(dispatch, Call("1", "late")) == [Result("1", error="unknown capability")]
    assert await collect(dispatch, Call("2", "echo", 1)) == [Result("2", 1)]


# -- failures become error results --------------------------------------------


async def test_a_raised_exception_becomes_an_error_result() -> None:
    async def fail(_: Any) -> NoReturn:
        raise ValueError("bad input: 42")

    assert await collect(handle({"fail": fail}), Call("e", "fail")) == [
        Result("e", error="bad input: 42", code="internal")
    ]


async def test_an_exception_without_message_sends_its_class_name() -> None:
    class QuotaExceeded(Exception):
        pass

    async def fail(_: Any) -> NoReturn:
        raise QuotaExceeded

    assert await collect(handle({"fail": fail}), Call("e", "fail")) == [
        Result("e", error="QuotaExceeded", code="internal")
    ]


async def test_the_error_is_the_message_never_a_traceback() -> None:
    async def fail(_: Any) -> NoReturn:
        raise RuntimeError("one line")

    [frame] = await collect(handle({"fail": fail}), Call("e", "fail"))
    assert isinstance(frame, Result)
    assert frame.error == "one line"
    assert "Traceback" not in frame.error


async def test_an_object_call_that_raises() -> None:
    class Broken:
        async def call(self, input: Any) -> NoReturn:
            raise KeyError(input)

    assert await collect(handle({"b": Broken()}), Call("e", "b", "k")) == [
        Result("e", error="'k'", code="internal")
    ]


async def test_raising_a_non_exception_value_becomes_an_error_result() -> None:
    # The Python form of the original's "throwing a non-Error value": raising
    # something that is not an exception is itself a TypeError.
    async def throw_a_number(_: Any) -> NoReturn:
        raise 42  # type: ignore[misc]  # noqa: B016 - that is the point

    [frame] = await collect(handle({"t": throw_a_number}), Call("e", "t"))
    assert isinstance(frame, Result)
    assert frame.id == "e"
    assert frame.error is not None
    assert "BaseException" in frame.error


async def test_a_capability_that_fails_before_awaiting() -> None:
    async def three_arguments(a: int, b: Any, c: int) -> int:  # pragma: no cover
        return a + c

    # Called with the input and an input stream (it has a second parameter),
    # it raises before any coroutine exists.
    dispatch = handle({"f": three_arguments})  # type: ignore[dict-item]
    [frame] = await collect(dispatch, Call("e", "f", 1))
    assert isinstance(frame, Result)
    assert frame.id == "e"
    assert frame.error is not None
    assert "missing 1 required positional argument" in frame.error


async def test_a_capability_returning_neither_awaitable_nor_stream() -> None:
    # Registration checks the class; an instance attribute can still shadow
    # its async ``call``. What it returns is checked when it runs.
    capability = Echo()
    dispatch = handle({"e": capability})
    assert await collect(dispatch, Call("1", "e", 1)) == [Result("1", {"echo": 1})]
    shadowed = Echo()
    shadowed.call = lambda input: input  # type: ignore[method-assign]
    [frame] = await collect(handle({"e": shadowed}), Call("2", "e", 1))
    assert frame == Result("2", error="capability returned int, not an awaitable", code="internal")


async def test_correlation_id_is_preserved() -> None:
    async def fail(_: Any) -> NoReturn:
        raise ValueError("x")

    dispatch = handle({"echo": echo, "count": count, "fail": fail})
    odd_id = "é-😀-" + "9" * 20
    for frames in (
        await collect(dispatch, Call(odd_id, "echo", 1)),
        await collect(dispatch, Call(odd_id, "count", 3)),
        await collect(dispatch, Call(odd_id, "fail")),
        await collect(dispatch, Call(odd_id, "nope")),
    ):
        assert frames
        assert {frame.id for frame in frames} == {odd_id}


# -- streams -------------------------------------------------------------------


async def test_a_stream_is_yields_then_exactly_one_result() -> None:
    frames = await collect(handle({"count": count}), Call("s", "count", 5))
    assert [type(f) for f in frames] == [Yield] * 5 + [Result]
    assert [f.output for f in frames[:-1]] == [0, 1, 2, 3, 4]
    assert frames[-1] == Result("s")


async def test_a_failing_stream_sends_its_items_then_the_error() -> None:
    async def partial_failure(_: Any) -> AsyncIterator[str]:
        yield "a"
        yield "b"
        raise RuntimeError("disk full")

    frames = await collect(handle({"p": partial_failure}), Call("s", "p"))
    assert frames == [
        Yield("s", "a"),
        Yield("s", "b"),
        Result("s", error="disk full", code="internal"),
    ]


async def test_a_stream_failing_at_once_sends_only_the_error() -> None:
    async def immediate_failure(value: Any) -> AsyncIterator[str]:
        if value is not None:
            yield "unreachable"  # pragma: no cover
        raise RuntimeError("nope")

    frames = await collect(handle({"p": immediate_failure}), Call("s", "p"))
    assert frames == [Result("s", error="nope", code="internal")]


async def test_an_empty_stream_is_only_a_result() -> None:
    async def empty(_: Any) -> AsyncIterator[int]:
        return
        yield  # pragma: no cover

    assert await collect(handle({"e": empty}), Call("s", "e")) == [Result("s")]
    assert await collect(handle({"c": count}), Call("t", "c", 0)) == [Result("t")]


async def test_a_streams_cleanup_runs_when_it_ends() -> None:
    cleaned: list[str] = []

    async def tidy(_: Any) -> AsyncIterator[int]:
        try:
            yield 1
        finally:
            cleaned.append("done")

    assert await collect(handle({"t": tidy}), Call("s", "t")) == [Yield("s", 1), Result("s")]
    assert cleaned == ["done"]


async def test_leaving_a_dispatch_early_closes_the_stream() -> None:
    cleaned = anyio.Event()

    async def endless(_: Any) -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            cleaned.set()

    dispatch = handle({"endless": endless})
    frames = dispatch(Call("s", "endless"))
    assert await anext(frames) == Yield("s", 0)
    await frames.aclose()  # type: ignore[attr-defined]
    assert cleaned.is_set()


# -- cancellation and other BaseExceptions propagate ----------------------------


class Interrupt(BaseException):
    """Like KeyboardInterrupt: not an Exception, so never an error result."""


async def test_base_exception_is_not_turned_into_a_result() -> None:
    async def interrupted(_: Any) -> NoReturn:
        raise Interrupt

    with pytest.raises(Interrupt):
        await collect(handle({"i": interrupted}), Call("1", "i"))


async def test_base_exception_in_a_stream_is_not_turned_into_a_result() -> None:
    seen: list[Yield | Result] = []

    async def interrupted(_: Any) -> AsyncIterator[int]:
        yield 1
        raise Interrupt

    with pytest.raises(Interrupt):
        await collect_into(handle({"i": interrupted})(Call("1", "i")), seen)
    assert seen == [Yield("1", 1)]


async def test_cancellation_is_not_turned_into_a_result() -> None:
    started = anyio.Event()
    cancelled = anyio.Event()
    seen: list[Yield | Result] = []

    async def wait_forever(_: Any) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async def consume() -> None:
        await collect_into(handle({"w": wait_forever})(Call("1", "w")), seen)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await started.wait()
        tg.cancel_scope.cancel()
    assert cancelled.is_set()
    assert seen == []


async def test_cancellation_of_a_stream_is_not_turned_into_a_result() -> None:
    seen: list[Yield | Result] = []
    first_item = anyio.Event()

    async def slow_stream(_: Any) -> AsyncIterator[int]:
        yield 1
        await anyio.sleep_forever()
        yield 2  # pragma: no cover

    async def consume() -> None:
        async for frame in handle({"s": slow_stream})(Call("1", "s")):
            seen.append(frame)
            first_item.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await first_item.wait()
        tg.cancel_scope.cancel()
    assert seen == [Yield("1", 1)]


# -- registration --------------------------------------------------------------


def sync_function(input: Any) -> Any:
    return input


class SyncCall:
    def call(self, input: Any) -> Any:
        return input


class NotCallable:
    pass


@pytest.mark.parametrize(
    "capability",
    [
        sync_function,
        lambda input: input,
        print,
        SyncCall(),
        SyncCall().call,
        functools.partial(sync_function),
        NotCallable,
        NotCallable(),
        42,
        "echo",
        None,
        {"call": echo},
    ],
    ids=[
        "sync function",
        "lambda",
        "builtin",
        "object with sync call",
        "bound sync method",
        "partial of sync function",
        "class",
        "object",
        "int",
        "str",
        "None",
        "dict with call key",
    ],
)
def test_registering_what_is_not_async_raises_type_error(capability: Any) -> None:
    with pytest.raises(TypeError, match="'bad'"):
        handle({"ok": echo, "bad": capability})


def test_registering_a_non_string_name_raises_type_error() -> None:
    with pytest.raises(TypeError, match="names must be strings"):
        handle({1: echo})  # type: ignore[dict-item]


def test_the_callable_protocol_is_structural() -> None:
    assert isinstance(Echo(), astral.Callable)
    assert not isinstance(NotCallable(), astral.Callable)


def test_a_resolved_table_resolves_to_itself() -> None:
    capabilities: dict[str, Any] = {"echo": echo}
    table = resolve(capabilities)
    assert resolve(table) is table
    assert resolve(dict(table)) is not table  # a plain mapping is resolved anew
