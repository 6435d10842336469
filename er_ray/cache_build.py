"""Building a cache: plan the documents not yet cached into shards, run the two Ray Data stages
(`er_ray.shard_encoder`), and commit each finished shard to its manifest (the driver). `ensure_cache` is what
training, sweeps and the demo call: a task's corpus cached (or extended) at the cut layers they need.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import storage
from .cache import KEY_FIELDS, SHARD, CacheMismatch, Manifest, check_key, layer_dir, open_cache, shard_name, versions
from .console import fmt_seconds, progress, say
from .corpus import doc_hashes, read_ids, resolve_corpus
from .errors import OptionsError, run_pipeline
from .options import CacheOptions


def plan_shards(file_ids: list[tuple[str, list[str]]], done: set[str], shard_rows: int) -> list[dict[str, Any]]:
    """Missing documents, in corpus order, cut into shards of shard_rows per file.

    Deterministic: a resumed run plans exactly the shards the interrupted one had not committed (committed shards
    are whole chunks, so the chunks of what remains are the same), and a grown corpus plans only new documents."""
    plans = []
    for f, ids in file_ids:
        todo = [(row, i) for row, i in enumerate(ids) if i not in done]
        for s in range(0, len(todo), shard_rows):
            chunk = todo[s:s + shard_rows]
            chunk_ids = [i for _, i in chunk]
            plans.append({"shard": shard_name(chunk_ids), "file": f, "rows": [r for r, _ in chunk],
                          "ids": chunk_ids})
    return plans



def build_cache(opts: CacheOptions) -> dict[int, Manifest]:
    """Encode a corpus's layer-k activations into OUTPUT, once: committed shards are skipped, so a re-run encodes
    nothing, an interrupted run resumes, and a grown corpus encodes only its new documents."""
    from .encoders import check_cut_layer, default_cut_layer
    from .pretrained import fingerprint

    storage.writable_folder(opts.output)
    corpus, task_type = None, None  # a derived layer: no corpus here, the classification default
    if opts.derive_from is None:
        corpus = corpus_of(opts.corpus, opts.id_column, opts.text_column, opts.context_column)
        task_type = "question_answering" if corpus.context_column else "classification"
        opts = opts.for_task_types([task_type])
    elif opts.max_length is None:  # a derived layer is cut from its source's rows: the source's max length
        source = storage.join(layer_dir(opts.output, opts.derive_from), "manifest.json")
        opts = replace(opts, max_length=Manifest.load(source).max_length) if storage.exists(source) else \
            opts.for_task_types([])  # no source: open_cache below says so
    fp = fingerprint(opts.model, opts.max_length)
    layers = sorted(set(opts.cut_layer)) or [default_cut_layer(fp["num_layers"], task_type)]
    for k in layers:
        check_cut_layer(k, fp["num_layers"], fp["model"], allow_last=True)
    if opts.derive_from is not None:
        return {k: derive_cache(opts, fp, k) for k in layers}
    file_ids = read_ids(corpus)
    # One builder per cache at a time: a second waits, then finds the first one's shards committed.
    with storage.exclusive(opts.output, lambda who: say("cache", f"waiting for {who}, which is building "
                                                                 f"{opts.output}")):
        return _build(opts, fp, layers, corpus, file_ids)


def _build(opts: CacheOptions, fp: dict[str, Any], layers: list[int], corpus, file_ids) -> dict[int, Manifest]:
    from .cluster import connect

    n_docs = sum(len(ids) for _, ids in file_ids)
    manifests = {k: _open_for_write(opts, fp, k, corpus.token_classification, corpus.context_column is not None)
                 for k in layers}
    hashes = doc_hashes(corpus) if any(m.shards for m in manifests.values()) else {}
    # Layers whose caches hold the same documents are encoded together, in one forward pass.
    groups: dict[frozenset, list[int]] = {}
    for k, m in manifests.items():
        shards = shard_ids(layer_dir(opts.output, k), m)
        if stale := stale_shards(m, shards, hashes):  # texts changed since: those shards are encoded again
            n = sum(len(shards[name]) for name in stale)
            say("cache", f"layer {k}: texts changed since they were cached in {len(stale)} shard(s) of {n:,} "
                         f"documents (e.g. {next(iter(stale))}): encoding those documents again")
            for name in stale:
                storage.delete(storage.join(layer_dir(opts.output, k), name))
                del shards[name]
            m.shards = [s for s in m.shards if s["file"] not in stale]
            m.save(storage.join(layer_dir(opts.output, k), "manifest.json"))
        done = frozenset({s["id"] for s in m.skipped}.union(*shards.values()))
        groups.setdefault(done, []).append(k)
    connect()
    for done, ks in groups.items():
        plans = plan_shards(file_ids, set(done), opts.shard_rows)
        todo = sum(len(p["ids"]) for p in plans)
        say("cache", f"{fp['model']} layer(s) {ks}: {n_docs:,} documents in the corpus, {len(done):,} cached, "
                     f"{todo:,} to encode in {len(plans)} shard(s)")
        if not plans:
            continue
        stage1 = dict(folder=fp["folder"], max_length=opts.max_length, id_column=corpus.id_column,
                      text_column=corpus.text_column, token_classification=corpus.token_classification,
                      context_column=corpus.context_column, skip_bad_rows=opts.skip_bad_rows)
        _run_pipeline(opts, fp, ks, plans, manifests, stage1=stage1)
    return manifests


def derive_cache(opts: CacheOptions, fp: dict[str, Any], k: int) -> Manifest:
    """OUTPUT/layer=<k> from OUTPUT/layer=<derive_from> by running only the layers in between."""
    from .cluster import connect

    a = opts.derive_from
    if not 0 <= a < k:
        raise OptionsError(f"--derive-from {a} must be shallower than the cut layer {k}")
    src = open_cache(opts.output, a, expect=fp)
    m = _open_for_write(opts, fp, k, src.manifest.token_classification, src.manifest.question_answering)
    have = {s["file"] for s in m.shards}
    plans = [{"shard": s["file"], "source": storage.join(storage.absolute(src.path), s["file"]),
              "dtype": src.manifest.dtype,
              "docs_sha256": s["docs_sha256"], "truncated": s.get("truncated", 0),
              "skipped": json.dumps(s.get("skipped", []))} for s in src.manifest.shards if s["file"] not in have]
    say("cache", f"deriving layer {k} from layer {a}: {len(src.manifest.shards)} shard(s), {len(plans)} to do")
    if plans:
        connect()
        _run_pipeline(opts, fp, [k], plans, {k: m}, stage1=None, from_layer=a)
    return m


def _open_for_write(opts: CacheOptions, fp: dict[str, Any], k: int, token_classification: bool,
                    question_answering: bool) -> Manifest:
    d = layer_dir(opts.output, k)
    key = {**{f: fp[f] for f in KEY_FIELDS if f in fp}, "cut_layer": k}
    m = None
    if storage.exists(storage.join(d, "manifest.json")):
        m = Manifest.load(storage.join(d, "manifest.json"))
        check_key(m, key, d)
        if m.dtype != opts.dtype:
            raise CacheMismatch(f"{d} was built with dtype={m.dtype!r}, but this run uses dtype={opts.dtype!r}; "
                                f"build into another directory")
        if m.shards and (m.question_answering, m.stride) != (question_answering,
                                                             qa_stride(question_answering, opts.max_length)):
            raise CacheMismatch(f"{d} holds {'question answering windows' if m.question_answering else 'documents'}"
                                f" (stride {m.stride}), this corpus is "
                                f"{'question answering' if question_answering else 'documents'}; build into "
                                f"another directory")
    # What a killed run wrote and never committed (temporary files; on object stores, whole shards uploaded but
    # not yet in the manifest): never visible to readers, now removed.
    committed = {s["file"] for s in m.shards} if m else set()
    for name in storage.listdir(d):
        if name.startswith((".tmp-", ".manifest.")) or (SHARD.match(name) and name not in committed):
            storage.delete(storage.join(d, name))
    if m:
        return m
    return Manifest(model=fp["model"], weights_sha256=fp["weights_sha256"], architecture=fp["architecture"],
                    num_layers=fp["num_layers"], hidden_size=fp["hidden_size"], cut_layer=k, dtype=opts.dtype,
                    max_length=opts.max_length, tokenizer_fingerprint=fp["tokenizer_fingerprint"],
                    token_classification=token_classification, question_answering=question_answering,
                    stride=qa_stride(question_answering, opts.max_length), versions=versions())


def qa_stride(question_answering: bool, max_length: int) -> int | None:
    """The overlap of a question answering cache's windows (er_ray.qa.stride; recorded in its manifest)."""
    from .qa import stride

    return stride(max_length) if question_answering else None


def shard_ids(d: str, m: Manifest) -> dict[str, list[str]]:
    """Each committed shard's document ids (for question answering: its questions, not its windows)."""
    col = m.document_column
    return {s["file"]: list(dict.fromkeys(storage.read_parquet(storage.join(d, s["file"]), [col]).column(col)
                                          .to_pylist())) for s in m.shards}


def stale_shards(m: Manifest, shards: dict[str, list[str]], hashes: dict[str, str]) -> dict[str, str]:
    """Shards whose documents' texts differ from the corpus's now (shard -> one of its ids): a shard's
    `docs_sha256` in the manifest hashes the (id, text) of each of its documents. A shard holding documents the
    corpus does not (another task's, over the same corpus name) cannot be checked here and is left alone."""
    stale = {}
    for s in m.shards:
        ids = shards[s["file"]]
        if ids and all(i in hashes for i in ids):
            if hashlib.sha256("".join(sorted(hashes[i] for i in ids)).encode()).hexdigest() != s["docs_sha256"]:
                stale[s["file"]] = ids[0]
    return stale


def _run_pipeline(opts: CacheOptions, fp: dict[str, Any], layers: list[int], plans: list[dict[str, Any]],
                  manifests: dict[int, Manifest], stage1: dict[str, Any] | None, from_layer: int | None = None):
    import ray.data

    from .cluster import cluster_cpus, cluster_gpus
    from .shard_encoder import ShardEncoder, tokenize_shard

    gpus = cluster_gpus()
    workers = opts.workers or max(1, gpus)
    threads = opts.threads or (None if gpus else max(1, int(cluster_cpus()) // workers))
    # One planned shard per block, so every shard reaches an actor whole.
    ds = ray.data.from_items(plans, override_num_blocks=len(plans))
    if stage1 is not None:
        # Tokenizing is cheap next to the encoder: two tasks at a time keep ahead of it and leave it the cores.
        ds = ds.map_batches(tokenize_shard, batch_size=None, batch_format="pyarrow", fn_kwargs=stage1,
                            num_cpus=0.25, compute=ray.data.TaskPoolStrategy(size=min(2, len(plans))))
    ds = ds.map_batches(
        ShardEncoder, batch_size=None, batch_format="pyarrow",
        fn_constructor_kwargs=dict(model=fp["model"], root=storage.absolute(opts.output), cut_layers=layers,
                                   dtype=opts.dtype, batch_size=opts.batch_size, threads=threads,
                                   key={"weights_sha256": fp["weights_sha256"]}, from_layer=from_layer,
                                   compression=opts.compression),
        # Two calls at once per actor: one shard's write overlaps the next one's forward passes (see ShardEncoder).
        compute=ray.data.ActorPoolStrategy(size=workers, max_concurrent_calls_per_actor=2,
                                           enable_true_multi_threading=True),
        num_gpus=1 if gpus else 0, num_cpus=1)
    run_pipeline(lambda: _commit_results(opts, ds, layers, len(plans), manifests))


def _commit_results(opts: CacheOptions, ds, layers: list[int], n_plans: int, manifests: dict[int, Manifest]):
    """Record each finished shard in its layer's manifest as it arrives (the manifest is the commit point)."""
    t0, docs, tokens, nbytes, shards = time.perf_counter(), 0, 0, 0, 0
    encoding = writing = 0.0  # the actors' own seconds: forward passes (per shard), writes (per file)
    # prefetch_batches=0: with prefetching, Ray Data's iterator hands a block over only once the next one has
    # arrived, so each shard was committed one actor call late (a kill then re-encoded a written shard).
    bar = progress("cache", n_plans)
    # question answering caches a row per window (a task spec's corpus names its context column, not opts)
    unit = "windows" if manifests[layers[0]].question_answering else "documents"
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for r in batch.to_pylist():
            m = manifests[r["cut_layer"]]
            skipped = json.loads(r["skipped"])
            entry = {k: r[k] for k in ("file", "rows", "tokens", "bytes", "sha256", "docs_sha256", "truncated")}
            if skipped:
                entry["skipped"] = skipped
            m.shards = sorted([s for s in m.shards if s["file"] != entry["file"]] + [entry], key=lambda s: s["file"])
            m.skipped = [s for s in m.skipped if s["id"] not in {x["id"] for x in skipped}] + skipped
            m.save(storage.join(layer_dir(opts.output, r["cut_layer"]), "manifest.json"))  # commit this shard
            if r["cut_layer"] == layers[0]:
                shards += 1
                docs += r["rows"]
                tokens += r["tokens"]
                encoding += r["seconds"]
            nbytes += r["bytes"]
            writing += r["write_seconds"]
        dt = time.perf_counter() - t0
        # Tokens/s while encoding against the end-to-end rate says where a slow build loses its time: in the
        # encoder itself, or in starting and feeding it.
        bar.update(shards, f"{shards}/{n_plans} shards, {docs:,} {unit}, {tokens:,} tokens, "
                   f"{tokens / dt:,.0f} tokens/s, {nbytes / 2**20:,.1f} MiB written, {fmt_seconds(dt)} (encoder: "
                   f"{tokens / max(encoding, 1e-9):,.0f} tokens/s over {encoding:,.1f} s of forward passes; "
                   f"writes {writing:,.1f} s)")
    bar.close()


def corpus_of(items: list[str], id_column: str = "id", text_column: str = "text", context_column: str | None = None):
    """`--corpus` as given: a built-in task or a task spec (all its documents), or corpus files."""
    from . import tasks

    if len(items) == 1 and (items[0] in tasks.BUILTINS or items[0].endswith((".yaml", ".yml"))):
        return tasks.load_task(items[0]).corpus()
    return resolve_corpus(items, id_column, text_column, context_column)


def cache_root(output: str | Path, corpus: str, model: str, max_length: int) -> str:
    """Where a corpus's cache lives by default (a location under OUTPUT): one per (corpus, model, max length),
    shared by every task and sweep trial over that corpus."""
    return storage.join(output, "caches", f"{corpus}-{model}-{max_length}")


def ensure_cache(task, root: str, model: str, max_length: int, dtype: str, layers: list[int]) -> str:
    """Build the cache of the task's corpus at these cut layers in `root` (one pass for all), or extend it with
    the documents or layers it lacks: nothing already encoded is encoded again. Returns `root`."""
    corpus = task.corpus()
    build_cache(CacheOptions(corpus=corpus.files, output=root, model=model, cut_layer=sorted(set(layers)),
                             dtype=dtype, max_length=max_length, text_column=corpus.text_column,
                             context_column=corpus.context_column))
    return root
