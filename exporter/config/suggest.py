""" "Did you mean": the known key closest to an unknown one, found by walking the models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, get_args, get_origin

from pydantic import BaseModel

# difflib's ratio: 0.6 pairs "servr"/"server" and "timeuot"/"timeout" but not "colour"/"log_level".
_CUTOFF = 0.6


def closest_key(root: type[BaseModel], loc: Sequence[Any]) -> str | None:
    """The key of the table at ``loc[:-1]`` closest to the unknown key ``loc[-1]``, if any."""
    if not loc or not isinstance(loc[-1], str):
        return None
    keys = _keys_at(root, loc[:-1])
    if not keys:
        return None
    import difflib  # only a bad file gets here: the daemon need not hold difflib (0.2 MB)

    matches = difflib.get_close_matches(loc[-1], keys, n=1, cutoff=_CUTOFF)
    return matches[0] if matches else None


def _keys_at(root: type[BaseModel], path: Sequence[Any]) -> list[str]:
    annotation: Any = root
    for part in path:
        if isinstance(part, int):
            annotation = _element(annotation)  # a list index: the element type
        elif _is_mapping(annotation):
            annotation = _mapping_value(annotation)  # a table key, such as a price glob
        else:
            model = _model_in(annotation)
            field = model.model_fields.get(str(part)) if model is not None else None
            if field is None:
                return []
            annotation = field.annotation
    model = _model_in(annotation)
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds, directly or as ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if _is_mapping(annotation):
        return None
    for arg in get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _element(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not Ellipsis]
    return args[0] if args else None


def _is_mapping(annotation: Any) -> bool:
    # pydantic strips FrozenMap's Annotated wrapper: field annotations are Mapping[K, V].
    origin = get_origin(annotation)
    return isinstance(origin, type) and issubclass(origin, Mapping)


def _mapping_value(annotation: Any) -> Any:
    args = get_args(annotation)
    return args[1] if len(args) == 2 else None
