"""Every verb's typed options: one model, each field declared once, composed.

The groups are the parts a run is made of; the verbs compose them:

    EncodingOptions  model, max_length, dtype              what a cache and every run over it agree on
    VariantOptions   cut_layer, adapter, adapter_size, ... what a task model is (a sweep's grid axes)
    RecipeOptions    epochs, learning_rate, seed, ...      how it is trained
    ScaleOptions     workers, cpus_per_worker, ...         how much of the cluster a run takes

    TrainOptions  = task, output, cache + all four groups          (er-ray train, finetune)
    SweepOptions  = a TrainOptions + grid axes + the scheduler      (er-ray sweep)
    StudyOptions  = a SweepOptions + models and seeds               (er-ray study)
    DemoOptions   = a TrainOptions + the task to compare            (er-ray demo)
    CacheOptions  = EncodingOptions + CorpusOptions + PoolOptions   (er-ray cache)
    PredictOptions = CorpusOptions + PoolOptions + run              (er-ray predict)

A field another verb holds is never declared again, with one exception, by design: a grid axis is the list of
values to try of a field its held options declare once (the sweep's `cut_layer: list[int]` over
`TrainOptions.cut_layer`; the study's `model` and `seed` lists), and replaces that field on the command line.
The string under each field is its `--help`; the defaults a run resolves per task type (adapter kind, learning
rate, warm-up) are `defaults.py`'s, with their evidence. `flags.py` turns these into flags (nested options
flatten into one flag set) and `--config recipe.yaml` files; Python callers build the same objects. This module
imports nothing heavy: `er-ray --help` must not pay for torch or Ray.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from .defaults import default_adapter, default_head_learning_rate, default_learning_rate, default_warmup
from .errors import OptionsError

Adapter = Literal["lora", "bottleneck", "full"]
ADAPTERS: tuple[str, ...] = ("lora", "bottleneck", "full")
Dtype = Literal["fp32", "fp16", "bf16", "int8"]
DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# The study's default tasks: er_ray.tasks.BUILTINS, named here without importing it, but squad (98,169 questions
# at 384 tokens: hours on a laptop; `er-ray study --task squad` asks for it)
BUILTIN_TASKS = ("trec", "sms_spam", "movie_sentiment", "clothing_rating", "clothing_recommended",
                 "clothing_department", "wnut16")
CLOTHING = ["clothing_rating", "clothing_recommended", "clothing_department"]


def _at_least(opts, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(opts, name)
        if value is not None and value < minimum:
            raise OptionsError(f"--{flag(name)} must be at least {minimum:g}, got {value}")


def flag(name: str) -> str:
    return name.replace("_", "-")


def _listed(value):
    """A single value where a list is expected (`task="trec"`) becomes a one-item list."""
    return [value] if isinstance(value, (str, int, float)) else list(value)


# ---------------------------------------------------------------------------------------------------------------
# The groups


@dataclass(kw_only=True)
class EncodingOptions:
    """What a cache and every run reading it agree on."""

    model: str = "minilm"
    """packaged model name (er-ray models), local folder, or hub id"""
    max_length: int | None = None
    """tokens per document at most; longer documents are truncated (and counted in the cache's manifest); question
    answering cuts each question + context into windows of this many tokens instead, with a stride of a third of
    it, at most 128 (default: 128; question answering 384, SQuAD's usual)"""
    dtype: Dtype = "fp16"
    """storage type of cached activations: fp16, bf16, int8 (per-token scale) or fp32"""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise OptionsError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        _at_least(self, 2, "max_length")

    def for_task_types(self, types: Iterable[str]):
        """These options with max_length resolved for tasks of these types (as given, if given)."""
        if self.max_length is not None:
            return self
        lengths = {default_max_length(t) for t in types}
        if len(lengths) > 1:
            raise OptionsError(f"question answering windows default to {MAX_LENGTH['question_answering']} tokens, "
                               f"other tasks to {MAX_LENGTH[None]}: give --max-length for tasks of both kinds at once, "
                               "or run them apart")
        return replace(self, max_length=lengths.pop() if lengths else MAX_LENGTH[None])


# Tokens per document when --max-length is not given. Question answering: a window of question + context; 384 with
# a 128-token stride is the standard SQuAD preprocessing (most contexts then fit in one or two windows). At 128 a
# SQuAD context needs ~2.4 windows, and an answer near a window's edge is seen only in the next one.
MAX_LENGTH: dict[str | None, int] = {"question_answering": 384, None: 128}


def default_max_length(task_type: str) -> int:
    return MAX_LENGTH.get(task_type, MAX_LENGTH[None])


@dataclass(kw_only=True)
class VariantOptions:
    """What a task model is: where it is cut and what of it trains (a sweep's grid axes)."""

    cut_layer: int | None = None
    """cut layer k: the task model runs layers k+1..L (default: half the layers; question answering a quarter,
    the paper's cut for QA)"""
    adapter: Adapter | None = None
    """full (upper layers fully trained, the paper's v1), lora (PEFT, size = rank) or bottleneck (Houlsby, size =
    width) (default: full on every task type, which reaches fine-tuning where LoRA trails it, BENCHMARKS.md; lora
    exports a task model ~16x smaller)"""
    adapter_size: int = 16
    """LoRA rank or bottleneck width"""
    learning_rate: float | None = None
    """peak learning rate, reached after the --warmup share of the steps and decayed linearly to 0 (default:
    lora 3e-3, bottleneck 1e-3, full 3e-4 and fine-tuning 1e-4, question answering too; for token classification:
    lora 1e-3 and full 1e-4; chosen on grids over the built-in tasks and both packaged models, BENCHMARKS.md)"""
    head_learning_rate: float | None = None
    """peak learning rate of the task head alone, which starts from random weights (default: --learning-rate;
    for token classification with full and fine-tuning: 1e-2); same warm-up and decay"""
    full_finetune: bool = False
    """train the whole model from text (the baseline), instead of a recycled model from the cache"""
    from_text: bool = False
    """run layers 1..k on raw text every step instead of reading the cache (with --cut-layer 0 and --adapter
    lora: PEFT LoRA on every layer, what a PEFT user does without er_ray)"""

    def __post_init__(self):
        if self.adapter is not None and self.adapter not in ADAPTERS:
            raise OptionsError(f"--adapter must be one of {', '.join(ADAPTERS)}, not {self.adapter!r}")
        if self.full_finetune:
            self.adapter = "full"
        _at_least(self, 1, "adapter_size")
        _at_least(self, 0, "cut_layer")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise OptionsError(f"--learning-rate must be above 0, got {self.learning_rate}")
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise OptionsError(f"--head-learning-rate must be above 0, got {self.head_learning_rate}")

    def adapter_for(self, task_type: str) -> str:
        """The adapter kind this run trains on a task of this type: --adapter, or the type's default."""
        return self.adapter or default_adapter(task_type)

    def kind_for(self, task_type: str) -> str:
        """What this run trains on a task of this type, as the default tables name it: "finetune" (the whole model
        from text, the baseline) or the recycled adapter kind."""
        return "finetune" if self.full_finetune else self.adapter_for(task_type)

    def lr(self, task_type: str) -> float:
        """The learning rate this run uses on a task of this type (required: each type has its own default)."""
        return self.learning_rate or default_learning_rate(self.kind_for(task_type), task_type)

    def head_lr(self, task_type: str) -> float | None:
        """The head's own peak rate on a task of this type: --head-learning-rate, or the default of what trains
        (None: the head trains at the run's learning rate)."""
        return self.head_learning_rate or default_head_learning_rate(self.kind_for(task_type), task_type)


@dataclass(kw_only=True)
class RecipeOptions:
    """How a task model is trained."""

    epochs: int = 3
    """passes over the training data at most (early stopping may end sooner)"""
    budget_seconds: float | None = None
    """seconds of training to spend (e.g. what fine-tuning took): after the first epoch, the epochs that fit are
    planned, at most --epochs, and the learning rate decays over them; set --epochs high enough"""
    warmup: float | None = None
    """share of the steps over which the learning rate rises to its peak, before it decays linearly to 0
    (default: lora 0.25, the others, token classification and fine-tuning 0.06)"""
    patience: int | None = 2
    """stop after this many epochs without a better dev metric (none: train every epoch)"""
    batch_size: int = 32
    """examples per step per worker"""
    seed: int = 0
    """seed for the head, adapters and data order"""
    max_train_examples: int | None = None
    """train on at most this many examples (quick runs); dev and test stay whole"""
    precision: Precision = "auto"
    """auto: fp32 on CPU, bf16 (or fp16 where bf16 is missing) on GPU; fp16 needs a GPU"""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1 or 2"""

    def __post_init__(self):
        _at_least(self, 1, "epochs", "patience", "batch_size", "max_train_examples")
        if self.warmup is not None and not 0 <= self.warmup < 1:
            raise OptionsError(f"--warmup is a share of the steps, from 0 to below 1, got {self.warmup}")
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            raise OptionsError(f"--budget-seconds must be above 0, got {self.budget_seconds}")
        if self.zero_stage not in (0, 1, 2):
            raise OptionsError("--zero-stage must be 0, 1 or 2 (ZeRO-3 is not supported: it partitions the frozen "
                               "weights too and makes adapter checkpoints costly)")


@dataclass(kw_only=True)
class ScaleOptions:
    """How much of the cluster a run takes."""

    workers: int = 1
    """Ray Train workers per run (data parallel)"""
    cpus_per_worker: float | None = None
    """CPUs Ray reserves per worker (default: a share that leaves room for Ray Data and concurrent runs)"""
    max_failures: int = 2
    """times a run restarts from its last checkpoint after a worker dies"""
    resource_wait: float = 600.0
    """seconds a run waits for its workers' CPUs (GPUs) before it fails, naming what holds them; 0 waits forever
    (an autoscaling cluster that takes longer to add nodes)"""

    def __post_init__(self):
        _at_least(self, 1, "workers")
        _at_least(self, 0, "max_failures", "resource_wait")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise OptionsError(f"--cpus-per-worker must be above 0, got {self.cpus_per_worker}")


@dataclass(kw_only=True)
class CorpusOptions:
    """Documents: a built-in task (all its documents), or corpus files."""

    corpus: list[str] = field(default_factory=list)
    """a built-in task name or task spec (all its documents), or corpus files / directories of .parquet, .csv,
    .jsonl"""
    id_column: str = "id"
    """column holding unique document ids"""
    text_column: str = "text"
    """column holding the text (or, for token classification corpora, the list of words; for question answering,
    the question)"""
    context_column: str | None = None
    """question answering: the column holding each question's context (a document is the pair, cached as
    windows)"""

    def __post_init__(self):
        self.corpus = _listed(self.corpus)


@dataclass(kw_only=True)
class PoolOptions:
    """The actors that run a model over documents (the cache's lower layers, predict's task model)."""

    workers: int | None = None
    """Ray Data actors (default: one per GPU; one on a CPU-only cluster). predict over an input under
    ER_RAY_DRIVER_READ_BYTES (1 GiB) on one machine runs on its own process instead, unless this is given"""
    batch_size: int = 64
    """documents per forward pass at most (bucketed by length; on CPU fewer where they are long, so that a layer's
    widest activation stays under glibc's 32 MiB mmap ceiling: batches over it page-fault their memory afresh)"""

    def __post_init__(self):
        _at_least(self, 1, "workers", "batch_size")


# ---------------------------------------------------------------------------------------------------------------
# The verbs


@dataclass(kw_only=True)
class TrainOptions(EncodingOptions, VariantOptions, RecipeOptions, ScaleOptions):
    """er-ray train / finetune: one task model per task, all at once."""

    task: list[str] = field(default_factory=list)
    """task(s): built-in names or spec files; several train concurrently over one cache"""
    output: str = "runs"
    """where runs, caches and the results table go"""
    cache: str | None = None
    """cache directory (default: OUTPUT/caches/<corpus>, built if missing: tasks sharing a corpus share it)"""

    def __post_init__(self):
        for base in (EncodingOptions, VariantOptions, RecipeOptions, ScaleOptions):
            base.__post_init__(self)
        self.task = _listed(self.task)

    def warmup_share(self, task_type: str) -> float:
        """The warm-up this run uses on a task of this type: --warmup, or the default of what it trains (its
        adapter kind, or fine-tuning's)."""
        return default_warmup(self.kind_for(task_type), task_type) if self.warmup is None else self.warmup

    def for_task_types(self, types: Iterable[str]):
        """These options with max_length (EncodingOptions) and the adapter kind resolved for tasks of these types;
        an adapter the types default differently is left to each run (`adapter_for`)."""
        types = list(types)
        opts = EncodingOptions.for_task_types(self, types)
        if opts.adapter is None and len(kinds := {default_adapter(t) for t in types}) == 1:
            opts = replace(opts, adapter=kinds.pop())
        return opts

    def require_task(self) -> None:
        if not self.task:
            raise OptionsError("name at least one --task (a built-in task: er-ray tasks; or a task spec file)")


@dataclass(kw_only=True)
class SweepOptions:
    """er-ray sweep: a grid of trials per task; each trial is `train` with one grid point put in."""

    # head_learning_rate stays a train option: a trial's name does not carry it, so a resumed sweep could not tell
    train: TrainOptions = field(default_factory=lambda: TrainOptions(output="sweep", patience=None, max_failures=1),
                                metadata={"hide": ("full_finetune", "from_text", "cache", "head_learning_rate")})
    """what every trial shares (its cut layer, adapter, size and learning rate come from the grid)"""
    cut_layer: list[int] = field(default_factory=list)
    """cut layers to try, e.g. 2,3,4 (default: about L/3, L/2 and 2L/3 of the model's L layers; for question
    answering also L/4)"""
    adapter: list[Adapter] = field(default_factory=lambda: list(ADAPTERS))
    """adapter kinds to try: lora, bottleneck, full (the whole upper layers); by default all three, the paper's
    configurations (a study reports the best of each at k = L/2)"""
    adapter_size: list[int] = field(default_factory=lambda: [8, 32])
    """adapter sizes to try (LoRA rank, bottleneck width; ignored by full)"""
    learning_rate: list[float] = field(default_factory=list)
    """learning rates to try (default: each adapter kind's, as `er-ray train` uses; for token classification's
    full both 1e-4 and 3e-4: the better one depends on the model)"""
    caches: str | None = None
    """where the caches live (default: the sweep's folder); point train runs and sweeps at one place to share"""
    max_concurrent_trials: int | None = None
    """trials at once (default: what the cluster's GPUs, or CPUs, hold)"""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha stops weak trials early (per task); fifo runs every trial to the end"""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped"""
    reduction_factor: float = 2
    """ASHA: keep the best 1/reduction_factor of trials at each rung"""

    def __post_init__(self):
        self.cut_layer, self.adapter = _listed(self.cut_layer), _listed(self.adapter)
        self.adapter_size, self.learning_rate = _listed(self.adapter_size), _listed(self.learning_rate)
        bad = [a for a in self.adapter if a not in ADAPTERS]
        if bad or not self.adapter:
            raise OptionsError(f"--adapter must be among {', '.join(ADAPTERS)} (got {bad or 'none'})")
        if bad := [s for s in self.adapter_size if s < 1]:
            raise OptionsError(f"--adapter-size must be at least 1, got {bad[0]}")
        if bad := [r for r in self.learning_rate if not r > 0]:
            raise OptionsError(f"--learning-rate must be above 0, got {bad[0]}")
        if bad := [k for k in self.cut_layer if k < 0]:
            raise OptionsError(f"--cut-layer must be at least 0, got {bad[0]}")
        _at_least(self, 1, "grace_period", "max_concurrent_trials")
        if self.reduction_factor <= 1:
            raise OptionsError(f"--reduction-factor must be above 1, got {self.reduction_factor}")
        if self.scheduler == "asha" and self.grace_period > self.train.epochs:
            raise OptionsError(f"--grace-period {self.grace_period} exceeds --epochs {self.train.epochs}")


def _study_sweep() -> SweepOptions:
    return SweepOptions(train=TrainOptions(task=list(BUILTIN_TASKS), output="study", patience=None, max_failures=1))


@dataclass(kw_only=True)
class StudyOptions:
    """er-ray study: per model, a sweep, then fine-tuning against the recycled picks, once per seed."""

    sweep: SweepOptions = field(default_factory=_study_sweep)
    """the sweep run per model; its train options are every run's (output: the study's folder)"""
    model: list[str] = field(default_factory=lambda: ["minilm", "mpnet"])
    """models to study"""
    seed: list[int] = field(default_factory=lambda: [0, 1, 2])
    """seeds: every compared configuration is trained once per seed (mean and spread reported); the sweep uses
    the first"""
    max_concurrent_runs: int | None = None
    """seed runs at once (default: one per GPU; one at a time on CPUs, so that their times compare fairly)"""
    finetune_learning_rate: list[float] = field(default_factory=list)
    """fine-tuning's learning rates: each task's best on dev (first seed) is trained for every seed, so recycling
    is compared with fine-tuning done well (one value: no pick; default 3e-5, 1e-4, 3e-4, and for question
    answering 1e-4, 3e-4)"""
    match_finetune_time: bool = False
    """also train the sweep's pick for fine-tuning's training seconds (its seed's, task's): as many epochs as fit
    them, up to 4x --epochs, best epoch on dev; a row of the report
    ("recycled best, finetune's time")"""

    def __post_init__(self):
        self.model, self.seed = _listed(self.model), _listed(self.seed)
        self.finetune_learning_rate = _listed(self.finetune_learning_rate)
        if not self.model or not self.seed:
            raise OptionsError("--model and --seed need at least one value each")
        if bad := [lr for lr in self.finetune_learning_rate if lr <= 0]:
            raise OptionsError(f"--finetune-learning-rate must be positive, got {bad[0]:g}")
        _at_least(self, 1, "max_concurrent_runs")

    @property
    def train(self) -> TrainOptions:
        return self.sweep.train


@dataclass(kw_only=True)
class DemoOptions:
    """er-ray demo: the main job on the embedded default."""

    train: TrainOptions = field(default_factory=lambda: TrainOptions(
        task=list(CLOTHING), output="demo-output", epochs=2, patience=None, max_train_examples=1000, max_length=64),
        metadata={"hide": ("full_finetune", "from_text", "cache", "head_learning_rate")})
    """the recycled runs (their cut layer, adapter and size); the baseline is the same with full fine-tuning"""
    compare: str = "clothing_department"
    """the task also fully fine-tuned from text, the baseline the recycled model is compared with"""

    def __post_init__(self):
        if self.compare not in self.train.task:
            raise OptionsError(f"--compare {self.compare} must be one of the --task list {self.train.task}")


@dataclass(kw_only=True)
class CacheOptions(EncodingOptions, CorpusOptions, PoolOptions):
    """er-ray cache: a corpus's layer-k activations, once."""

    output: str = ""
    """cache directory or URI (s3://bucket/prefix?endpoint_override=...); each cut layer goes to
    OUTPUT/layer=<k>/ with its manifest.json"""
    cut_layer: list[int] = field(default_factory=list)
    """cut layer(s) k, comma-separated (e.g. 2,3,4): all from one forward pass (default: half the layers; a
    question-answering corpus a quarter)"""
    threads: int | None = None
    """torch threads per actor on CPU (default: the cluster's CPUs divided among the actors)"""
    shard_rows: int = 1024
    """documents per Parquet shard: the unit of work, of resume and of verification"""
    compression: Literal["none", "zstd", "lz4", "snappy"] = "zstd"
    """Parquet compression of the shards (zstd makes fp16 caches ~8% smaller for ~1% of the build time)"""
    skip_bad_rows: bool = False
    """skip empty, missing or non-string texts (counted and listed in the manifest) instead of failing"""
    derive_from: int | None = None
    """derive the cut layer(s) from this shallower layer's cache in OUTPUT (no raw text, no lower layers)"""

    def __post_init__(self):
        for base in (EncodingOptions, CorpusOptions, PoolOptions):
            base.__post_init__(self)
        self.cut_layer = _listed(self.cut_layer)
        _at_least(self, 1, "threads", "shard_rows")
        _at_least(self, 0, "derive_from")
        if not self.output:
            raise OptionsError("--output is required: the cache directory")
        if not self.corpus and self.derive_from is None:
            raise OptionsError("--corpus is required (a built-in task, or corpus files)")


@dataclass(kw_only=True)
class PredictOptions(CorpusOptions, PoolOptions):
    """er-ray predict: label documents with a trained run."""

    run: list[str] = field(default_factory=list)
    """trained runs' directories (holding model/task.json), as `er-ray train` prints them: paths or URIs. Several
    runs over one model and cut layer share one pass: the cache is read (or the lower layers run) once for all"""
    output: str = ""
    """directory for the predictions (Parquet: id, label, score; token tasks: tags per word): a path or a URI;
    with several runs, one folder per run (OUTPUT/<run name>/predictions.parquet)"""
    cache: str | None = None
    """read layer-k states from this cache instead of running the lower layers on raw text"""

    def __post_init__(self):
        for base in (CorpusOptions, PoolOptions):
            base.__post_init__(self)
        self.run = _listed(self.run)
        if not self.run or not self.output:
            raise OptionsError("--run and --output are required")
        names = [r.rstrip("/").rsplit("/", 1)[-1] for r in self.run]
        if len(self.run) > 1 and (twice := sorted({n for n in names if names.count(n) > 1})):
            raise OptionsError(f"--run: two runs named {twice[0]!r}; their predictions would share "
                               f"OUTPUT/{twice[0]}/ (predict them separately)")
