"""Validation at the edge: capabilities with model-typed inputs, and typed refs."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, TypedDict

import anyio
import msgspec
import pydantic
import pytest
import typing_extensions

import astral
from astral import _validation
from astral._dispatch import resolve
from astral.testing import connected_pair

if TYPE_CHECKING:
    from decimal import Decimal  # only for the annotation that cannot be resolved


class User(msgspec.Struct):
    name: str
    age: int


class Node(msgspec.Struct):
    value: int
    children: list[Node] = []


class Limited(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(max_length=16)]


class PUser(pydantic.BaseModel):
    name: str
    age: int


class TUser(TypedDict):
    name: str
    age: int


class XUser(typing_extensions.TypedDict):
    # pydantic refuses typing.TypedDict before Python 3.12.
    name: str
    age: int


@dataclasses.dataclass
class DUser:
    name: str
    age: int


@pydantic.dataclasses.dataclass
class PDUser:
    name: str
    age: int


def nested(depth: int, leaf: object = 1) -> dict[str, object]:
    node: dict[str, object] = {"value": leaf}
    for _ in range(depth - 1):
        node = {"value": 1, "children": [node]}
    return node


class Recorder:
    """Capabilities that record what they were given."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    def capabilities(self) -> dict[str, astral.Capability]:
        seen = self.seen

        async def struct(user: User) -> User:
            seen.append(user)
            return User(user.name.upper(), user.age + 1)

        async def model(user: PUser) -> PUser:
            seen.append(user)
            return PUser(name=user.name.upper(), age=user.age + 1)

        async def typed_dict(user: TUser) -> TUser:
            seen.append(user)
            return {"name": user["name"].upper(), "age": user["age"] + 1}

        async def data(user: DUser) -> DUser:
            seen.append(user)
            return DUser(user.name.upper(), user.age + 1)

        async def pydantic_data(user: PDUser) -> PDUser:
            seen.append(user)
            return PDUser(name=user.name.upper(), age=user.age + 1)

        async def tree(node: Node) -> int:
            seen.append(node)
            depth = 1
            while node.children:
                node, depth = node.children[0], depth + 1
            return depth

        async def limited(value: Limited) -> str:
            seen.append(value)
            return value.name

        async def users(n: int) -> AsyncIterator[User]:
            for i in range(n):
                yield User(f"u{i}", i)

        async def models(first: PUser) -> AsyncIterator[PUser]:
            seen.append(first)
            yield first
            yield PUser(name="next", age=first.age + 1)

        return {
            "struct": struct,
            "model": model,
            "typed_dict": typed_dict,
            "data": data,
            "pydantic_data": pydantic_data,
            "tree": tree,
            "limited": limited,
            "users": users,
            "models": models,
        }


ALICE = {"name": "alice", "age": 41}
ALICE_NEXT = {"name": "ALICE", "age": 42}


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("struct", User),
        ("model", PUser),
        ("typed_dict", dict),
        ("data", DUser),
        ("pydantic_data", PDUser),
    ],
)
async def test_valid_input_is_converted_and_output_encoded(name: str, kind: type) -> None:
    recorder = Recorder()
    async with connected_pair(recorder.capabilities(), {}) as (_, caller):
        assert await caller.call(name, ALICE) == ALICE_NEXT
    [given] = recorder.seen
    assert type(given) is kind
    if kind is dict:
        assert given == ALICE
    else:
        assert (given.name, given.age) == ("alice", 41)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("struct", "invalid input: Expected `int`, got `str` - at `$.age`"),
        ("typed_dict", "invalid input: Expected `int`, got `str` - at `$.age`"),
        ("data", "invalid input: Expected `int`, got `str` - at `$.age`"),
        (
            "model",
            "invalid input: Input should be a valid integer, "
            "unable to parse string as an integer - at `$.age`",
        ),
        (
            "pydantic_data",
            "invalid input: Input should be a valid integer, "
            "unable to parse string as an integer - at `$.age`",
        ),
    ],
)
async def test_wrong_type_fails_the_call_without_running_it(name: str, message: str) -> None:
    recorder = Recorder()
    async with connected_pair(recorder.capabilities(), {}) as (_, caller):
        with pytest.raises(astral.RemoteError) as caught:
            await caller.call(name, {"name": "alice", "age": "forty"})
        assert str(caught.value) == message
        assert caught.value.code == "invalid_input"
        # The connection and the capability are fine for the next call.
        assert await caller.call(name, ALICE) == ALICE_NEXT
    assert len(recorder.seen) == 1


@pytest.mark.parametrize("name", ["struct", "model", "typed_dict", "data", "pydantic_data"])
@pytest.mark.parametrize("value", [None, [1, 2], "alice", 7, {"name": "alice"}])
async def test_wrong_shapes_are_refused(name: str, value: object) -> None:
    recorder = Recorder()
    async with connected_pair(recorder.capabilities(), {}) as (_, caller):
        with pytest.raises(astral.RemoteError) as caught:
            await caller.call(name, value)
    assert str(caught.value).startswith("invalid input: ")
    assert recorder.seen == []


async def test_missing_field_names_the_field() -> None:
    recorder = Recorder()
    async with connected_pair(recorder.capabilities(), {}) as (_, caller):
        with pytest.raises(astral.RemoteError) as struct_error:
            await caller.call("struct", {"name": "alice"})
        with pytest.raises(astral.RemoteError) as model_error:
            await caller.call("model", {"name": 1})
    assert str(struct_error.value) == "invalid input: Object missing required field `age`"
    # pydantic reports every problem: the first, and how many more.
    assert str(model_error.value) == (
        "invalid input: Input should be a valid string - at `$.name` (and 1 more)"
    )


async def test_deep_nesting_is_validated_and_the_path_named() -> None:
    recorder = Recorder()
    async with connected_pair(recorder.capabilities(), {}) as (_, caller):
        assert await caller.call("tree", nested(30)) == 30
        with pytest.raises(astral.RemoteError) as caught:
            await caller.call("tree", nested(30, leaf="deep"))
    path = "$" + ".children[0]" * 29 + ".value"
    assert str(caught.value) == f"invalid input: Expected `int`, got `str` - at `{path}`"
    assert len(recorder.seen) == 1


async def test_nesting_beyond_the_frame_limit_never_reaches_validation() -> None:
    recorder = Recorder()
    async with connected_pair(recorder.capabilities(), {}) as (_, caller):
        with pytest.raises(astral.ProtocolError):
            await caller.call("tree", nested(200))
        assert await caller.call("tree", nested(2)) == 2


async def test_huge_strings_are_refused_without_being_quoted() -> None:
    recorder = Recorder()
    huge = "x" * 500_000
    async with connected_pair(recorder.capabilities(), {}) as (_, caller):
        with pytest.raises(astral.RemoteError) as wrong_type:
            await caller.call("struct", {"name": "alice", "age": huge})
        with pytest.raises(astral.RemoteError) as too_long:
            await caller.call("limited", {"name": huge})
        with pytest.raises(astral.RemoteError) as model_error:
            await caller.call("model", {"name": "alice", "age": huge})
    assert str(wrong_type.value) == "invalid input: Expected `int`, got `str` - at `$.age`"
    assert str(too_long.value) == ("invalid input: Expected `str` of length <= 16 - at `$.name`")
    assert len(str(model_error.value)) < 200
    assert recorder.seen == []


async def test_streamed_items_are_encoded() -> None:
    recorder = Recorder()
    async with connected_pair(recorder.capabilities(), {}) as (_, caller):
        async with caller.stream("users", 3) as items:
            assert [item async for item in items] == [
                {"name": "u0", "age": 0},
                {"name": "u1", "age": 1},
                {"name": "u2", "age": 2},
            ]
        async with caller.stream("models", ALICE) as items:
            assert [item async for item in items] == [ALICE, {"name": "next", "age": 42}]
        with pytest.raises(astral.RemoteError, match=r"^invalid input: "):
            async with caller.stream("models", {"age": 1}) as items:
                async for _ in items:
                    pass


async def test_handle_validates_too() -> None:
    dispatch = astral.handle(Recorder().capabilities())
    frames = [frame async for frame in dispatch(astral.Call("1", "struct", {"age": 1}))]
    assert frames == [
        astral.Result(
            "1", error="invalid input: Object missing required field `name`", code="invalid_input"
        )
    ]


async def test_objects_and_partials_are_validated() -> None:
    class Service:
        async def call(self, user: User) -> User:
            return user

    async def tagged(tag: str, user: User) -> str:
        return f"{tag}:{user.name}"

    capabilities = {"object": Service(), "partial": functools.partial(tagged, "t")}
    async with connected_pair(capabilities, {}) as (_, caller):
        assert await caller.call("object", ALICE) == ALICE
        assert await caller.call("partial", ALICE) == "t:alice"
        for name in capabilities:
            with pytest.raises(astral.RemoteError, match=r"^invalid input: "):
                await caller.call(name, {"name": 1, "age": 1})


def test_plain_capabilities_are_not_wrapped() -> None:
    # No per-call cost where nothing is validated: the function itself runs.
    async def plain(x: dict[str, int]) -> list[int]:
        return list(x.values())

    async def bare(x):  # type: ignore[no-untyped-def]
        return x

    async def unresolvable(x: Decimal) -> Decimal:
        return x

    table = resolve({"plain": plain, "bare": bare, "unresolvable": unresolvable})
    assert table == {"plain": plain, "bare": bare, "unresolvable": unresolvable}


def test_validated_capabilities_are_wrapped_once_per_function() -> None:
    async def struct(user: User) -> None:
        pass

    assert resolve({"s": struct})["s"] is not struct
    plan = _validation._plans[struct]
    assert plan[0] is not None
    assert plan[0].type is User
    resolve({"s": struct})
    assert _validation._plans[struct] is plan  # inspected once, not per registration


def test_without_a_library_typeddict_and_dataclass_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "msgspec", None)
    monkeypatch.setitem(sys.modules, "pydantic", None)

    async def data(user: DUser) -> None:
        pass

    async def typed_dict(user: TUser) -> None:
        pass

    for name, capability in [("data", data), ("typed_dict", typed_dict)]:
        with pytest.raises(TypeError) as caught:
            resolve({name: capability})
        assert str(caught.value).startswith(f"capability {name!r}: validating a")
        assert "pip install 'astral-rpc[validation]'" in str(caught.value)


async def test_without_msgspec_pydantic_validates_dataclasses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "msgspec", None)

    async def data(user: DUser) -> DUser:
        return DUser(user.name.upper(), user.age + 1)

    async def typed_dict(user: XUser) -> XUser:
        return {"name": user["name"].upper(), "age": user["age"] + 1}

    async with connected_pair({"data": data, "typed_dict": typed_dict}, {}) as (_, caller):
        for name in ("data", "typed_dict"):
            assert await caller.call(name, ALICE) == ALICE_NEXT
            with pytest.raises(astral.RemoteError) as caught:
                await caller.call(name, {"name": "alice", "age": [1]})
            assert str(caught.value) == (
                "invalid input: Input should be a valid integer - at `$.age`"
            )


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="pydantic takes typing.TypedDict")
def test_pydantic_refusing_a_type_is_a_registration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "msgspec", None)

    async def typed_dict(user: TUser) -> None:
        pass

    with pytest.raises(TypeError, match=r"^capability 'typed_dict': pydantic cannot validate"):
        resolve({"typed_dict": typed_dict})


@dataclasses.dataclass
class Ambiguous:
    # msgspec cannot tell two dataclasses apart in a union.
    user: DUser | DUser2


@dataclasses.dataclass
class DUser2:
    login: str


def test_unsupported_field_types_are_refused_at_registration() -> None:
    async def ambiguous(value: Ambiguous) -> None:
        pass

    with pytest.raises(TypeError, match=r"^capability 'ambiguous': msgspec cannot validate"):
        resolve({"ambiguous": ambiguous})


def test_models_local_to_a_function_are_not_resolved() -> None:
    # With postponed annotations a class defined in a function is not
    # resolvable from the module, so it is not validated (documented).
    @dataclasses.dataclass
    class Local:
        x: int

    async def local(value: Local) -> None:
        pass

    assert resolve({"local": local}) == {"local": local}


def test_import_astral_imports_no_validation_library() -> None:
    code = (
        "import sys, astral\n"
        "print(','.join(m for m in ('msgspec', 'pydantic') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


def test_the_error_is_made_in_one_place() -> None:
    error = _validation.invalid_input("Expected `int`, got `str` - at `$.age`")
    assert str(error) == "invalid input: Expected `int`, got `str` - at `$.age`"


# -- typed refs -------------------------------------------------------------


async def test_ref_encodes_input_and_converts_output() -> None:
    recorder = Recorder()
    struct = astral.ref("struct", input=User, output=User)
    model = astral.ref("model", input=PUser, output=PUser)
    data = astral.ref("data", input=DUser, output=DUser)
    async with connected_pair(recorder.capabilities(), {}) as (_, caller):
        assert await caller.call(struct, User("alice", 41)) == User("ALICE", 42)
        assert await caller.call(model, PUser(name="alice", age=41)) == PUser(name="ALICE", age=42)
        assert await caller.call(data, DUser("alice", 41)) == DUser("ALICE", 42)


async def test_ref_with_plain_types_passes_values_through() -> None:
    async def echo(value: object) -> object:
        return value

    echo_ref = astral.ref("echo", input=str, output=str)
    async with connected_pair({"echo": echo}, {}) as (_, caller):
        assert await caller.call(echo_ref, "uptime") == "uptime"


async def test_ref_output_that_does_not_fit_raises_validation_error() -> None:
    async def wrong(_: object) -> dict[str, object]:
        return {"name": "alice", "age": "old"}

    async def items(_: object) -> AsyncIterator[dict[str, object]]:
        yield {"name": "a", "age": 1}
        yield {"name": "b"}
        yield {"name": "c", "age": 3}

    async def nothing(_: object) -> None:
        pass

    capabilities = {"wrong": wrong, "items": items, "nothing": nothing}
    async with connected_pair(capabilities, {}) as (_, caller):
        with pytest.raises(astral.ValidationError) as caught:
            await caller.call(astral.ref("wrong", input=int, output=User), 1)
        assert str(caught.value) == "invalid output: Expected `int`, got `str` - at `$.age`"
        assert isinstance(caught.value, astral.CallError)
        with pytest.raises(astral.ValidationError, match=r"^invalid output: Expected `object`"):
            await caller.call(astral.ref("nothing", input=int, output=User), 1)
        async with caller.stream(astral.ref("items", input=int, output=User), 1) as stream:
            assert await anext(stream) == User("a", 1)
            with pytest.raises(astral.ValidationError, match="missing required field `age`"):
                await anext(stream)
            assert await anext(stream) == User("c", 3)


async def test_ref_stream_items_are_converted() -> None:
    users = astral.ref("users", input=int, output=User)
    async with connected_pair(Recorder().capabilities(), {}) as (_, caller):
        async with caller.stream(users, 2) as items:
            assert [item async for item in items] == [User("u0", 0), User("u1", 1)]
        # call() on a streaming capability: a Stream, its items converted too.
        stream = await caller.call(users, 2)
        assert isinstance(stream, astral.Stream)
        async with stream:
            assert [item async for item in stream] == [User("u0", 0), User("u1", 1)]


async def test_ref_keeps_timeout() -> None:
    started = anyio.Event()

    async def slow(_: object) -> None:
        started.set()
        await anyio.sleep_forever()

    slow_ref = astral.ref("slow", input=int, output=int)
    async with connected_pair({"slow": slow}, {}) as (_, caller):
        with pytest.raises(astral.CallTimeout):
            await caller.call(slow_ref, 1, timeout=0.05)
    assert started.is_set()


def test_ref_is_an_immutable_value() -> None:
    bash = astral.ref("bash", input=str, output=str)
    assert (bash.name, bash.input, bash.output) == ("bash", str, str)
    assert bash == astral.ref("bash", input=str, output=str)
    assert bash != astral.ref("bash", input=str, output=int)
    assert hash(bash) == hash(astral.ref("bash", input=str, output=str))
    assert repr(bash) == "astral.ref('bash', input=str, output=str)"
    with pytest.raises(AttributeError):
        bash.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        astral.ref(1, input=str, output=str)  # type: ignore[arg-type]


async def test_a_ref_converts_output_and_stream_items_when_middleware_observe_the_call() -> None:
    """With middleware installed a call takes another path: conversion must not stay behind."""
    ended: list[astral.CallInfo] = []

    @asynccontextmanager
    async def observe(info: astral.CallInfo) -> AsyncIterator[None]:
        yield
        ended.append(info)

    struct = astral.ref("struct", input=User, output=User)
    users = astral.ref("users", input=int, output=User)
    async with connected_pair(Recorder().capabilities(), {}, middleware=[observe]) as (_, caller):
        assert await caller.call(struct, User("alice", 41)) == User("ALICE", 42)
        async with caller.stream(users, 2) as items:
            assert [item async for item in items] == [User("u0", 0), User("u1", 1)]
        # A call that turns out to stream converts its items too.
        streamed = await caller.call(users, 2)
        assert [item async for item in streamed] == [User("u0", 0), User("u1", 1)]
    assert [
        (info.direction, info.capability) for info in ended if info.direction == "outbound"
    ] == [
        ("outbound", "struct"),
        ("outbound", "users"),
        ("outbound", "users"),
    ]
