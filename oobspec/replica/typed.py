"""Typed arguments: a method's annotations, checked and converted with pydantic.

Built once per method when its server starts (one `TypeAdapter` per annotated parameter), so a
request pays only for the parameters it fills that have a type worth checking: unannotated,
`Any`, `object` and `str` parameters cost nothing, and a method with none of the others costs
nothing at all (`Signature.typed` is None).

Path and query values are text and convert as FastAPI converts them (pydantic's lax mode:
"5" -> 5, "yes" -> True, "2024-01-02" -> a date, "red" -> Color.red); a parameter typed as a
list, set or tuple takes every value of a repeated query key. A JSON body's values are
validated as their types. A method with exactly one parameter typed as a pydantic model or a
dataclass takes the whole JSON body as that parameter (FastAPI's single body parameter); its
other parameters come from the path and the query.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import logging
import types
import typing
from typing import Any

from pydantic_core import ValidationError

log = logging.getLogger("oobspec")

_FREE = (str, object, Any)  # parameters that take what they get, unchecked
_MANY = frozenset((list, set, frozenset, tuple, collections.abc.Sequence, collections.abc.Set,
                   collections.abc.MutableSequence, collections.abc.Iterable, collections.abc.Collection))
_SHOWN = 3  # errors named in the one-line "error" of a 422 (all of them are in "detail")


def _unwrap(annotation: Any) -> Any:
    """`X | None` / Optional[X] -> X (anything else as it is)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def is_model(annotation: Any) -> bool:
    """A pydantic model or a dataclass (optional or not): a JSON object's worth of fields."""
    cls = _unwrap(annotation)
    if not inspect.isclass(cls):
        return False
    if dataclasses.is_dataclass(cls):
        return True
    from pydantic import BaseModel
    return issubclass(cls, BaseModel)


def takes_many(annotation: Any) -> bool:
    """list[int], set[str], tuple[int, ...]: a repeated query key gives every value."""
    cls = _unwrap(annotation)
    return cls in _MANY or typing.get_origin(cls) in _MANY


def mend_dataclasses(annotation: Any, seen: set | None = None) -> None:
    """Give the dataclasses in an annotation back their `dataclasses.MISSING`. A dataclass that
    travelled by value (cloudpickle: the user's own module, shipped with the actor) comes back
    with a copy of that sentinel as each field's default and default_factory, and pydantic then
    refuses the class ("cannot specify both default and default_factory")."""
    seen = set() if seen is None else seen
    if id(annotation) in seen:
        return
    seen.add(id(annotation))
    for arg in typing.get_args(annotation):
        mend_dataclasses(arg, seen)
    if not (inspect.isclass(annotation) and dataclasses.is_dataclass(annotation)):
        return
    for f in annotation.__dataclass_fields__.values():
        for attribute in ("default", "default_factory"):
            value = getattr(f, attribute)
            if type(value) is type(dataclasses.MISSING) and value is not dataclasses.MISSING:
                setattr(f, attribute, dataclasses.MISSING)
        if not isinstance(f.type, str):
            mend_dataclasses(f.type, seen)


def adapter(annotation: Any):
    """The TypeAdapter of one annotation; None where nothing needs checking or pydantic cannot
    build one (an arbitrary class): that parameter then takes what it gets, as before."""
    if annotation is inspect.Parameter.empty or annotation is None or annotation in _FREE:
        return None
    from pydantic import TypeAdapter
    mend_dataclasses(annotation)
    try:
        made = TypeAdapter(annotation)
        made.validator.validate_python  # noqa: B018 (a validator left unbuilt raises here, not per request)
        return made
    except Exception:  # PydanticSchemaGenerationError, a forward reference that does not resolve...
        log.debug("no validation for annotation %r", annotation, exc_info=True)
        return None


class Typed:
    """The typed parameters of one method."""

    __slots__ = ("adapters", "many", "whole")

    def __init__(self, adapters: dict[str, Any], many: frozenset[str], whole: str | None):
        # (name, pydantic-core's own validate_python): a quarter of TypeAdapter.validate_python's cost
        self.adapters = tuple((name, a.validator.validate_python) for name, a in adapters.items())
        self.many = many  # names that take every value of a repeated query key
        self.whole = whole  # the one model/dataclass parameter: the whole body

    @classmethod
    def of(cls, annotations: dict[str, Any]) -> Typed | None:
        """annotations: parameter name -> its resolved annotation."""
        adapters = {name: a for name, hint in annotations.items() if (a := adapter(hint)) is not None}
        models = [name for name, hint in annotations.items() if name in adapters and is_model(hint)]
        many = frozenset(name for name, hint in annotations.items() if name in adapters and takes_many(hint))
        if not adapters:
            return None
        return cls(adapters, many, models[0] if len(models) == 1 else None)

    def convert(self, kwargs: dict, path: frozenset = frozenset(), body: dict | None = None,
                whole: bool = True) -> list[dict] | None:
        """Validate and convert `kwargs` in place; the errors in FastAPI's shape (loc, msg, type)
        or None. `path`: the names the path filled; `body`: what the JSON body filled (the rest
        came from the query); whole: the body was the `whole` parameter itself."""
        errors = None
        for name, check in self.adapters:
            if name in kwargs:
                try:
                    kwargs[name] = check(kwargs[name])
                except ValidationError as exc:
                    where = self._where(name, path, body, whole)
                    errors = (errors or []) + [
                        {"loc": [*where, *e["loc"]], "msg": e["msg"], "type": e["type"]}
                        for e in exc.errors(include_url=False, include_input=False, include_context=False)]
        return errors

    def _where(self, name: str, path: frozenset, body: dict | None, whole: bool) -> tuple:
        if body is not None and name in body:
            return ("body",) if whole and name == self.whole else ("body", name)
        return ("path" if name in path else "query", name)


def summary(errors: list[dict]) -> str:
    """The one line a 422's "error" says: `query n: Input should be a valid integer...`."""
    said = [f"{' '.join(str(part) for part in e['loc'])}: {e['msg']}" for e in errors[:_SHOWN]]
    more = len(errors) - _SHOWN
    return "invalid arguments: " + "; ".join(said) + (f" (and {more} more)" if more > 0 else "")
