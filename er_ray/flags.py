"""The flat view of a verb's options: one list of fields (its flags, grouped for --help) and options built back
from flat values. The CLI, `--config` recipe files and Python callers who prefer one flat call all use this; the
options themselves (their fields, defaults and checks) live in `options.py`, declared once."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

from .errors import OptionsError
from .options import flag

@dataclasses.dataclass
class Flag:
    name: str  # the field's name: --name-with-dashes
    type: Any
    default: Any
    doc: str
    group: str  # the title of the options group that declares it
    positional: bool = False


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (how litgpt and jsonargparse document options)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _declared_by(cls: type, name: str) -> type:
    """The class in cls's MRO whose own body declares the field (for grouping the help)."""
    for klass in reversed(cls.__mro__):
        if name in klass.__dict__.get("__annotations__", {}):
            return klass
    return cls


def _title(klass: type) -> str:
    return (inspect.getdoc(klass) or klass.__name__).splitlines()[0].rstrip(".")


def held_options(cls: type) -> dict[str, type]:
    """Fields of a verb's options that hold other options (a sweep's `train`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def flags(cls: type, defaults: Any = None) -> list[Flag]:
    """The flat flag list of a verb's options: the fields of the options it holds (with their defaults as this verb
    sets them), minus those its own fields replace (grid axes) or it sets itself (`hide`), then its own fields;
    grouped for --help by the class that declares them, verbs before the groups they compose."""
    hints, docs, nested = typing.get_type_hints(cls), field_docs(cls), held_options(cls)
    own = [f for f in dataclasses.fields(cls) if f.init and f.name not in nested]
    names = {f.name for f in own}
    out = []
    for name, inner in nested.items():
        f = next(x for x in dataclasses.fields(cls) if x.name == name)
        inner_defaults = getattr(defaults, name) if defaults is not None else _default(f)
        hidden = names | set(f.metadata.get("hide", ()))
        out += [x for x in flags(inner, inner_defaults) if x.name not in hidden]
    for f in own:
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        out.append(Flag(f.name, hints[f.name], default, docs.get(f.name, ""), _title(_declared_by(cls, f.name)),
                        positional=f.metadata.get("positional", False)))
    verbs = [x.group for x in out if x.group not in _GROUP_TITLES]
    rank = {g: i for i, g in enumerate(dict.fromkeys(verbs + list(_GROUP_TITLES)))}
    return sorted(out, key=lambda x: rank[x.group])  # stable: fields keep their order within a group


_GROUP_TITLES = ("Documents: a built-in task (all its documents), or corpus files",
                 "What a task model is: where it is cut and what of it trains (a sweep's grid axes)",
                 "How a task model is trained", "What a cache and every run reading it agree on",
                 "How much of the cluster a run takes",
                 "The actors that run a model over documents (the cache's lower layers, predict's task model)")


def build(cls: type, values: dict[str, Any] | None = None, base: Any = None, **more: Any):
    """Options of `cls` from flat values (flag names, as `--help` shows them): the CLI, recipe files and Python
    callers who prefer one flat call all go through here. Unknown names are an error."""
    values = {**(values or {}), **more}
    known = {f.name for f in flags(cls)}
    if unknown := sorted(set(values) - known):
        raise OptionsError(f"unknown option(s) {', '.join('--' + flag(u) for u in unknown)} "
                           f"(see --help for this verb's options)")
    return _build(cls, values, base)


def _build(cls: type, values: dict[str, Any], base: Any):
    nested = held_options(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in nested:
            inner_base = getattr(base, f.name) if base is not None else _default(f)
            own = {x.name for x in dataclasses.fields(cls) if x.name not in nested}
            kwargs[f.name] = _build(nested[f.name], {k: v for k, v in values.items() if k not in own}, inner_base)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        elif base is not None:
            kwargs[f.name] = getattr(base, f.name)
    return cls(**kwargs)
