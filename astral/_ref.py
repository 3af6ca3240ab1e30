"""Typed references to remote capabilities: :func:`ref`.

A :class:`Ref` is a capability's name together with the types of its input
and output. Passed to :meth:`Peer.call <astral.Peer.call>` or
:meth:`Peer.stream <astral.Peer.stream>` instead of the name, it lets a type
checker see what goes in and what comes out. When a type is a model type
(see :mod:`astral._validation`) the input is encoded and the output
validated by the same library at run time too, so the static type is true.

This module does no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, final

from ._validation import adapter, invalid_output

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Callable
    from types import EllipsisType

__all__ = ["Ref", "Signed", "ref", "unref"]

InputT = TypeVar("InputT")
OutputT = TypeVar("OutputT")
OutputT_co = TypeVar("OutputT_co", covariant=True)
ArgsT = ParamSpec("ArgsT")


class Signed(Protocol[ArgsT, OutputT_co]):
    """For type checkers only: what :meth:`Peer.call` accepts in place of a name.

    :meth:`Peer.call` takes the rest of its arguments as ``ArgsT``, so a type
    checker first learns the input type from the reference, then checks the
    input against it (inferring both at once fails for a ``TypedDict`` given
    as a literal).
    """

    def _signature(self, *args: ArgsT.args, **kwargs: ArgsT.kwargs) -> OutputT_co: ...


@final
class Ref(Generic[InputT, OutputT]):
    """A remote capability's name, with the types of its input and output.

    Made by :func:`ref`; immutable. ``peer.call(ref, input)`` is typed as
    returning ``OutputT`` and requires an ``InputT``; ``peer.stream(ref,
    input)`` yields a ``Stream[OutputT]``.

    Attributes:
        name: The capability's registered name on the remote.
        input: The declared input type.
        output: The declared output type (of each item, for a stream).
    """

    __slots__ = ("_decode", "_encode", "input", "name", "output")

    name: str
    input: type[InputT]
    output: type[OutputT]
    _encode: Callable[[Any], Any] | None
    _decode: Callable[[Any], Any] | None

    def __init__(self, name: str, input: type[InputT], output: type[OutputT]) -> None:
        if not isinstance(name, str):
            raise TypeError(f"a capability name must be a string, not {type(name).__name__}")
        set_ = object.__setattr__
        set_(self, "name", name)
        set_(self, "input", input)
        set_(self, "output", output)
        encoder = adapter(input)
        decoder = adapter(output)
        set_(self, "_encode", encoder.encode if encoder is not None else None)
        set_(self, "_decode", _decoder(decoder.decode) if decoder is not None else None)

    if TYPE_CHECKING:

        def _signature(
            self,
            input: InputT,
            /,
            *,
            timeout: float | EllipsisType | None = ...,
            deadline: float | None = None,
            input_stream: AsyncIterable[Any] | None = None,
        ) -> OutputT: ...

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Ref is immutable")

    def __repr__(self) -> str:
        return (
            f"astral.ref({self.name!r}, input={_type_name(self.input)}, "
            f"output={_type_name(self.output)})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ref):
            return NotImplemented
        return (self.name, self.input, self.output) == (other.name, other.input, other.output)

    def __hash__(self) -> int:
        return hash((self.name, self.input, self.output))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__qualname__", None) or repr(tp)


def _decoder(decode: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def checked(value: Any) -> Any:
        try:
            return decode(value)
        except ValueError as exc:
            raise invalid_output(str(exc)) from None

    return checked


def ref(name: str, *, input: type[InputT], output: type[OutputT]) -> Ref[InputT, OutputT]:
    """A typed reference to the remote capability ``name``.

    ::

        bash = astral.ref("bash", input=str, output=str)
        text = await peer.call(bash, "uptime")  # a type checker sees str

    Args:
        name: The capability's registered name on the remote.
        input: The type of its input. A msgspec ``Struct``, pydantic model,
            ``TypedDict`` or dataclass is encoded by its library when sent.
        output: The type of its output, or of each item it streams. A model
            type is validated and converted by its library when received; a
            value that does not fit raises :class:`~astral.ValidationError`.
            Other types are only for the type checker.

    Returns:
        The reference, to pass to :meth:`Peer.call` or :meth:`Peer.stream`.

    Raises:
        TypeError: If ``name`` is not a string, or a type is a ``TypedDict``
            or dataclass while neither msgspec nor pydantic is installed.
    """
    return Ref(name, input, output)


def unref(
    capability: str | Ref[Any, Any], input: Any
) -> tuple[str, Any, Callable[[Any], Any] | None]:
    """The name, the input as sent, and the output converter of a call."""
    if type(capability) is not Ref:
        return capability, input, None
    encode = capability._encode
    if encode is not None and input is not None:
        input = encode(input)
    return capability.name, input, capability._decode
