"""Validation at the edge: typed inputs and outputs for capabilities and refs.

A capability whose input parameter is annotated with a *model type* gets its
input validated and converted before it runs, and its output (or each
streamed item) encoded by the same library when its return annotation names
a model type. A model type is one of:

* a ``msgspec.Struct`` subclass (checked and converted by msgspec);
* a pydantic ``BaseModel`` subclass or pydantic dataclass (by pydantic);
* a ``TypedDict`` or a standard dataclass (by msgspec, the fast path, or by
  pydantic when msgspec is not installed).

Anything else (``str``, ``dict[str, int]``, no annotation...) is passed
through untouched, as before: no per-call cost for plain capabilities.

Annotations are resolved once, when the capabilities are registered
(:func:`adapt`), never per call. Neither library is imported here unless
the annotation already comes from it (a ``Struct`` can only exist once
msgspec is imported) or a ``TypedDict``/dataclass needs one, so
``import astral`` imports neither.

The error text names the path and the problem and never quotes the value,
in msgspec's words: ``Expected `int`, got `str` - at `$.age```. It is made
in one place, :func:`invalid_input`.

This module does no I/O.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib
import inspect
import logging
import sys
import typing
import weakref
from typing import TYPE_CHECKING, Any

from ._exceptions import Failure, ValidationError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = ["Adapter", "adapt", "adapter", "invalid_input", "invalid_output"]

logger = logging.getLogger("astral.validation")

_MISSING_LIBRARY = (
    "validating {what} needs msgspec or pydantic: pip install 'astral-rpc[validation]'"
)


def invalid_input(problem: str) -> Exception:
    """The exception an input that does not fit its capability fails the call with.

    The capability does not run; the caller receives the message as a
    :class:`~astral.RemoteError` with code ``"invalid_input"``. It is a
    :class:`~astral.Failure`: expected, so logged at DEBUG only, and never
    hidden by ``hide_internal_errors``.

    Args:
        problem: What is wrong and where, e.g. ``"Expected `int`, got `str` - at `$.age`"``.

    Returns:
        The exception to raise.
    """
    return Failure(f"invalid input: {problem}", code="invalid_input")


def invalid_output(problem: str) -> ValidationError:
    """The exception a remote output that does not fit a typed ref raises."""
    return ValidationError(f"invalid output: {problem}")


class Adapter:
    """How one model type is checked (``decode``) and written out (``encode``).

    ``decode(value)`` turns plain JSON values into the type, raising
    :class:`ValueError` with the problem and its path; ``encode(value)``
    turns an instance back into plain JSON values.
    """

    __slots__ = ("decode", "encode", "library", "type")

    def __init__(
        self,
        type: Any,
        library: str,
        decode: Callable[[Any], Any],
        encode: Callable[[Any], Any],
    ) -> None:
        self.type = type
        self.library = library
        self.decode = decode
        self.encode = encode

    def __repr__(self) -> str:
        return f"<Adapter {getattr(self.type, '__name__', self.type)!r} by {self.library}>"


def _module(name: str) -> Any:
    # Only a module already imported can have made the annotation's class.
    return sys.modules.get(name)


def _installed(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _is_typeddict(tp: Any) -> bool:
    if typing.is_typeddict(tp):
        return True
    extensions = _module("typing_extensions")
    return bool(extensions is not None and extensions.is_typeddict(tp))


def adapter(tp: Any) -> Adapter | None:
    """The adapter for a model type, or ``None`` for any other annotation.

    Args:
        tp: A resolved annotation.

    Returns:
        The adapter, or ``None`` when ``tp`` is not a model type.

    Raises:
        TypeError: If ``tp`` is a ``TypedDict`` or a dataclass and neither
            msgspec nor pydantic is installed, or the library cannot handle
            one of its field types.
    """
    msgspec = _module("msgspec")
    if msgspec is not None and isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _msgspec_adapter(msgspec, tp)
    pydantic = _module("pydantic")
    if pydantic is not None and isinstance(tp, type):
        if issubclass(tp, pydantic.BaseModel):
            return _pydantic_model_adapter(tp)
        if pydantic.dataclasses.is_pydantic_dataclass(tp):
            return _pydantic_adapter(pydantic, tp)
    is_dataclass = isinstance(tp, type) and dataclasses.is_dataclass(tp)
    if not (is_dataclass or _is_typeddict(tp)):
        return None
    msgspec = _installed("msgspec")
    if msgspec is not None:
        return _msgspec_adapter(msgspec, tp)
    pydantic = _installed("pydantic")
    if pydantic is not None:
        return _pydantic_adapter(pydantic, tp)
    what = "a dataclass" if is_dataclass else "a TypedDict"
    raise TypeError(_MISSING_LIBRARY.format(what=what) + f" ({tp.__qualname__})")


def _msgspec_adapter(msgspec: Any, tp: Any) -> Adapter:
    try:
        msgspec.inspect.type_info(tp)  # refuses unsupported field types now
    except TypeError as exc:
        raise TypeError(f"msgspec cannot validate {tp.__qualname__}: {exc}") from None
    convert, error, to_builtins = msgspec.convert, msgspec.ValidationError, msgspec.to_builtins

    def decode(value: Any) -> Any:
        try:
            return convert(value, tp)
        except error as exc:
            raise ValueError(str(exc)) from None

    # A TypedDict is a dict: it goes out as it is, without a copy.
    return Adapter(tp, "msgspec", decode, _same if _is_typeddict(tp) else to_builtins)


def _pydantic_problem(exc: Any) -> str:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    path = "$" + "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]
    )
    problem = first["msg"]
    if path != "$":
        problem += f" - at `{path}`"
    if len(errors) > 1:
        problem += f" (and {len(errors) - 1} more)"
    return str(problem)


def _pydantic_model_adapter(tp: Any) -> Adapter:
    pydantic = sys.modules["pydantic"]  # the model's own library, so already imported
    base_model, pydantic_error = pydantic.BaseModel, pydantic.ValidationError

    validate = tp.model_validate

    def decode(value: Any) -> Any:
        try:
            return validate(value)
        except pydantic_error as exc:
            raise ValueError(_pydantic_problem(exc)) from None

    def encode(value: Any) -> Any:
        if isinstance(value, base_model):
            return value.model_dump(mode="json")
        return value

    return Adapter(tp, "pydantic", decode, encode)


def _pydantic_adapter(pydantic: Any, tp: Any) -> Adapter:
    try:
        type_adapter = pydantic.TypeAdapter(tp)
    except pydantic.PydanticUserError as exc:  # includes PydanticSchemaGenerationError
        raise TypeError(f"pydantic cannot validate {tp.__qualname__}: {exc}") from None
    validate, dump, error = (
        type_adapter.validate_python,
        type_adapter.dump_python,
        pydantic.ValidationError,
    )

    def decode(value: Any) -> Any:
        try:
            return validate(value)
        except error as exc:
            raise ValueError(_pydantic_problem(exc)) from None

    if _is_typeddict(tp):
        # A TypedDict is a dict: it goes out as it is.
        return Adapter(tp, "pydantic", decode, _same)

    def encode(value: Any) -> Any:
        return dump(value, mode="json") if isinstance(value, tp) else value

    return Adapter(tp, "pydantic", decode, encode)


def _same(value: Any) -> Any:
    return value


# -- capabilities ---------------------------------------------------------

_STREAM_ORIGINS = (
    collections.abc.AsyncIterator,
    collections.abc.AsyncIterable,
    collections.abc.AsyncGenerator,
)


def _hint(function: Any, name: str) -> Any:
    """One resolved annotation of ``function``, or ``None`` if absent or unresolvable.

    Resolved one at a time, so that a name imported only under
    ``TYPE_CHECKING`` elsewhere in the signature does not hide a model type.
    """
    annotations = getattr(function, "__annotations__", None)
    if not isinstance(annotations, dict) or name not in annotations:
        return None

    def probe() -> None: ...  # pragma: no cover - never called

    probe.__annotations__ = {"x": annotations[name]}
    try:
        return typing.get_type_hints(
            probe, globalns=getattr(function, "__globals__", {}), include_extras=False
        )["x"]
    except Exception:
        logger.debug("annotation %r of %r not resolved", name, function, exc_info=True)
        return None


def _signature_target(invoke: Any) -> tuple[Any, str | None]:
    """The function whose annotations describe ``invoke``, and its input's name."""
    try:
        signature = inspect.signature(invoke)
    except (TypeError, ValueError):
        return None, None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    first = next((p for p in signature.parameters.values() if p.kind in kinds), None)
    target = invoke
    while isinstance(target, functools.partial):
        target = target.func
    target = getattr(target, "__func__", target)  # a bound method
    if not inspect.isfunction(target) and callable(target):
        target = type(target).__call__  # an object with an async __call__
    return inspect.unwrap(target), first.name if first is not None else None


#: Adapters found for each function, so a principal that builds a Peer per
#: connection inspects each capability once, not once per connection.
_plans: weakref.WeakKeyDictionary[Any, tuple[Adapter | None, Adapter | None]] = (
    weakref.WeakKeyDictionary()
)


def _plan(invoke: Any) -> tuple[Adapter | None, Adapter | None]:
    key = getattr(invoke, "__func__", invoke)
    try:
        return _plans[key]
    except (KeyError, TypeError):
        pass
    target, parameter = _signature_target(invoke)
    if target is None:
        return None, None
    decode = adapter(_hint(target, parameter)) if parameter is not None else None
    returns = _hint(target, "return")
    if inspect.isasyncgenfunction(target) or typing.get_origin(returns) in _STREAM_ORIGINS:
        args = typing.get_args(returns)
        returns = args[0] if args else None
    encode = adapter(returns)
    try:
        _plans[key] = (decode, encode)
    except TypeError:
        pass  # not weak-referenceable: inspected again next time
    return decode, encode


def adapt(invoke: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a resolved capability so it validates its input and encodes its output.

    Args:
        invoke: The capability as it will be called with the input.

    Returns:
        ``invoke`` itself when no annotation names a model type; otherwise a
        function that converts the input (raising :func:`invalid_input`
        without running the capability when it does not fit), runs
        ``invoke`` and encodes its output or each streamed item.

    Raises:
        TypeError: If an annotation is a ``TypedDict`` or dataclass and no
            validation library is installed.
    """
    decode_adapter, encode_adapter = _plan(invoke)
    if decode_adapter is None and encode_adapter is None:
        return invoke
    decode = decode_adapter.decode if decode_adapter is not None else None
    encode = encode_adapter.encode if encode_adapter is not None else None

    def validated(value: Any) -> Any:
        if decode is not None:
            try:
                value = decode(value)
            except ValueError as exc:
                raise invalid_input(str(exc)) from None
        output = invoke(value)
        if encode is None:
            return output
        if inspect.isawaitable(output):
            return _encoded(output, encode)
        if isinstance(output, collections.abc.AsyncIterable):
            return _encoded_items(output, encode)
        return output

    return validated


async def _encoded(output: Awaitable[Any], encode: Callable[[Any], Any]) -> Any:
    value = await output
    if isinstance(value, collections.abc.AsyncIterable):
        return _encoded_items(value, encode)
    return encode(value)


async def _encoded_items(
    items: collections.abc.AsyncIterable[Any], encode: Callable[[Any], Any]
) -> AsyncIterator[Any]:
    iterator = aiter(items)
    try:
        async for item in iterator:
            yield encode(item)
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
