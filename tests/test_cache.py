"""The layer-k cache on real Ray Data, real Parquet and the real MiniLM."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import all_cpus_free

from er_ray import cache, codec, storage, tasks
from er_ray.cache import CacheError, CacheMismatch, open_cache
from er_ray.cache_build import build_cache
from er_ray.corpus import DataError
from er_ray.options import CacheOptions

ER_RAY = str(Path(sys.executable).with_name("er-ray"))
N_DOCS = 160


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real TREC questions plus two long clothing reviews (to be truncated), as a Parquet corpus."""
    d = tmp_path_factory.mktemp("corpus")
    docs = tasks.load_task("trec").documents().slice(0, N_DOCS - 2).to_pylist()
    long = tasks.load_task("clothing_rating").documents().to_pylist()
    long = [r for r in long if len(r["text"]) > 450][:2]
    table = pa.Table.from_pylist(docs + long)
    pq.write_table(table, d / "corpus.parquet")
    return d / "corpus.parquet", table


def build(corpus_path, out, **kw):
    opts = dict(corpus=[str(corpus_path)], output=str(out), max_length=64, shard_rows=48, batch_size=16)
    opts.update(kw)
    return build_cache(CacheOptions(**opts))


def full_last_hidden(enc, texts, max_length=64):
    b = enc.tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = enc.model(**b).last_hidden_state
    return [out[i, : int(b["attention_mask"][i].sum())] for i in range(len(texts))]


@pytest.fixture(scope="module")
def fp32_cache(ray_local, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    manifests = build(corpus[0], out, cut_layer=[2, 3], dtype="fp32")
    return out, manifests


def test_rows_ids_manifest_and_plain_pyarrow(fp32_cache, corpus, minilm):
    out, manifests = fp32_cache
    ids = corpus[1].column("id").to_pylist()
    for k in (2, 3):
        c = open_cache(out, k, expect={"weights_sha256": minilm.weights_sha256})
        m = c.manifest
        assert sorted(c.ids()) == sorted(ids) and m.rows == N_DOCS
        assert m.truncated == 2  # the two long reviews
        assert (m.model, m.architecture, m.hidden_size, m.cut_layer, m.dtype, m.max_length) == \
            ("minilm", "bert", 384, k, "fp32", 64)
        assert m.weights_sha256 == minilm.weights_sha256 and m.tokenizer_fingerprint == minilm.tokenizer_fingerprint
        assert len(m.shards) == 4 and [s["rows"] for s in m.shards if s["rows"] != 48] == [16]
        assert m.versions["ray"] == "2.60.0" and len(m.corpus_fingerprint) == 64
        on_disk = sorted(p.name for p in c.path.iterdir())
        assert on_disk == sorted([s["file"] for s in m.shards] + ["manifest.json"])  # no temp files left
    # plain pyarrow, no Ray, no er_ray: the schema is the contract
    t = pq.read_table(out / "layer=3" / manifests[3].shards[0]["file"])
    assert t.schema.field("id").type == pa.string() and t.schema.field("length").type == pa.int32()
    assert t.schema.field("hidden").type == pa.list_(pa.binary(4 * 384))
    row = t.slice(0, 1).to_pylist()[0]
    assert len(row["hidden"]) == row["length"] and len(row["hidden"][0]) == 4 * 384
    # decoded with nothing but numpy, as the format documents
    col = t.column("hidden").combine_chunks()
    flat = np.frombuffer(col.values.buffers()[1], np.float32).reshape(-1, 384)
    assert flat.shape[0] == sum(t.column("length").to_pylist())
    ref, _ = codec.decode_hidden(t, "fp32", 384)
    assert np.array_equal(flat, ref)


def test_read_ids_keeps_the_wanted_rows_in_the_caches_order(fp32_cache, corpus):
    """A small task's rows are read on the driver in one filtered pass (no Ray Data tasks to start)."""
    out, _ = fp32_cache
    c = open_cache(out, 3)
    every = c.read(["id", "length"])
    ids = every.column("id").to_pylist()
    want = set(ids[::3]) | {"not-in-the-cache"}
    got = c.read_ids(want, ["id", "length"])
    assert got.column("id").to_pylist() == [i for i in ids if i in want]  # the manifest's shard order, no strays
    assert got.column("length").to_pylist() == every.column("length").to_pylist()[::3]
    assert c.read_ids(set(), ["id"]).num_rows == 0


def test_cached_rows_through_upper_equal_the_full_model(fp32_cache, corpus, minilm):
    out, _ = fp32_cache
    texts = dict(zip(corpus[1].column("id").to_pylist(), corpus[1].column("text").to_pylist()))
    sample = list(texts)[:20] + list(texts)[-2:]  # includes the truncated reviews
    full = full_last_hidden(minilm, [texts[i] for i in sample])
    for k in (2, 3):
        acts = open_cache(out, k).activations()
        _, upper = minilm.split(k)
        for i, ref in zip(sample, full):
            h = torch.from_numpy(acts[i])[None]
            with torch.no_grad():
                got = upper(h, torch.ones(1, h.shape[1], dtype=torch.long)).last_hidden_state[0]
            assert got.shape == ref.shape
            assert (got - ref).abs().max().item() <= 1e-5, (k, i)


@pytest.mark.parametrize("dtype,min_cos", [("fp16", 0.999), ("bf16", 0.999), ("int8", 0.99)])
def test_compressed_caches_keep_the_last_layer(ray_local, corpus, minilm, tmp_path, dtype, min_cos):
    build(corpus[0], tmp_path, cut_layer=[3], dtype=dtype)
    c = open_cache(tmp_path, 3)
    acts = c.activations()
    ids = corpus[1].column("id").to_pylist()[:40]
    texts = corpus[1].column("text").to_pylist()[:40]
    _, upper = minilm.split(3)
    worst = 1.0
    for i, ref in zip(ids, full_last_hidden(minilm, texts)):
        h = torch.from_numpy(acts[i])[None]
        with torch.no_grad():
            got = upper(h, torch.ones(1, h.shape[1], dtype=torch.long)).last_hidden_state[0]
        worst = min(worst, torch.nn.functional.cosine_similarity(got, ref, dim=-1).min().item())
    assert worst >= min_cos, f"{dtype}: worst token cosine {worst}"
    per_token = c.manifest.bytes / c.manifest.real_tokens
    limit = {"fp16": 2 * 384 * 1.05, "bf16": 2 * 384 * 1.05, "int8": 384 + 8}[dtype]
    assert per_token <= limit, f"{dtype}: {per_token:.1f} bytes per real token"


def test_rerun_encodes_nothing_and_grown_corpus_only_new(ray_local, corpus, tmp_path, capfd):
    path, table = corpus
    small = tmp_path / "small.parquet"
    pq.write_table(table.slice(0, 100), small)
    build(small, tmp_path / "c", cut_layer=[3])
    before = json.loads((tmp_path / "c/layer=3/manifest.json").read_text())
    capfd.readouterr()
    build(small, tmp_path / "c", cut_layer=[3])
    assert "100 cached, 0 to encode in 0 shard(s)" in capfd.readouterr().err
    assert json.loads((tmp_path / "c/layer=3/manifest.json").read_text())["shards"] == before["shards"]
    build(path, tmp_path / "c", cut_layer=[3])  # the corpus grew by 60 documents
    err = capfd.readouterr().err
    assert "100 cached, 60 to encode in 2 shard(s)" in err
    # Progress names the end-to-end rate and the encoder's own rate while it computes, from the actors' timings.
    last = re.findall(r"2/2 shards, 60 documents, ([\d,]+) tokens, .* \(encoder: ([\d,]+) tokens/s over ([\d.]+) s "
                      r"of forward passes; writes ([\d.]+) s\)", err)
    assert last and int(last[-1][1].replace(",", "")) > 0 and float(last[-1][2]) > 0, err[-2000:]
    after = open_cache(tmp_path / "c", 3).manifest
    assert after.rows == N_DOCS
    assert all(s in after.shards for s in before["shards"])  # old shards untouched


def _reference(ray_local, corpus, root):
    if not (root / "layer=3/manifest.json").exists():
        build(corpus[0], root, cut_layer=[3], shard_rows=16)
    return open_cache(root, 3).manifest


def _cli_build(corpus_path, out):
    return subprocess.Popen([ER_RAY, "cache", "--corpus", str(corpus_path), "--output", str(out), "--cut-layer", "3",
                             "--max-length", "64", "--shard-rows", "16", "--batch-size", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": ""})


def _wait_for_shards(out, n, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        mf = out / "layer=3/manifest.json"
        if mf.exists() and len(json.loads(mf.read_text())["shards"]) >= n:
            return
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    raise TimeoutError("no shard committed")


def _assert_same_cache(out, ref):
    got = open_cache(out, 3).manifest
    key = lambda m: sorted((s["file"], s["rows"], s["sha256"]) for s in m.shards)
    assert key(got) == key(ref)  # same shards, same ids, same bytes
    assert got.corpus_fingerprint == ref.corpus_fingerprint
    assert not list((out / "layer=3").glob(".tmp-*"))


def test_killed_driver_resumes_to_the_same_cache(ray_local, corpus, tmp_path_factory):
    ref = _reference(ray_local, corpus, tmp_path_factory.getbasetemp() / "ref16")
    out = tmp_path_factory.mktemp("killed")
    proc = _cli_build(corpus[0], out)
    _wait_for_shards(out, 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-run
    proc.wait()
    done_before = len(json.loads((out / "layer=3/manifest.json").read_text())["shards"])
    assert 2 <= done_before < len(ref.shards)
    again = _cli_build(corpus[0], out)
    log = again.communicate(timeout=300)[0].decode()
    assert again.returncode == 0, log[-3000:]
    assert f"{done_before * 16:,} cached" in log  # only what was missing was encoded
    _assert_same_cache(out, ref)


def test_killed_worker_then_rerun_gives_the_same_cache(ray_local, corpus, tmp_path_factory):
    import psutil

    ref = _reference(ray_local, corpus, tmp_path_factory.getbasetemp() / "ref16")
    out = tmp_path_factory.mktemp("killed_worker")
    proc = _cli_build(corpus[0], out)
    _wait_for_shards(out, 1, proc)
    victims = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "ShardEncoder" in " ".join(p.cmdline())]
    assert victims, "no encoder worker process found"
    for p in victims:
        p.kill()  # SIGKILL the lower-encoder actor's process
    proc.communicate(timeout=300)  # Ray restarts the actor and finishes, or the run fails: both are fine
    again = _cli_build(corpus[0], out)
    log = again.communicate(timeout=300)[0].decode()
    assert again.returncode == 0, log[-3000:]
    _assert_same_cache(out, ref)


def test_verify_catches_a_flipped_byte_and_a_deleted_shard(fp32_cache, tmp_path):
    src, manifests = fp32_cache
    out = tmp_path / "c"
    shutil.copytree(src, out)
    assert cache.verify(out) == []
    shards = manifests[3].shards
    f = out / "layer=3" / shards[0]["file"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    (out / "layer=3" / shards[1]["file"]).unlink()
    problems = cache.verify(out)
    assert len(problems) == 2
    assert any(shards[0]["file"] in p and "checksum mismatch" in p for p in problems)
    assert any(shards[1]["file"] in p and "missing shard" in p for p in problems)
    res = subprocess.run([ER_RAY, "cache", "verify", str(out)], capture_output=True, text=True)
    assert res.returncode == 1 and res.stdout.count("BAD ") == 2
    assert subprocess.run([ER_RAY, "cache", "verify", str(src)], capture_output=True).returncode == 0


def test_a_damaged_or_missing_shard_is_refused_before_anything_is_read(fp32_cache, tmp_path):
    """`er-ray train` used to read a shard that `er-ray cache verify` rejected (one flipped byte) and train on it."""
    src, manifests = fp32_cache
    out = tmp_path / "c"
    shutil.copytree(src, out)
    assert open_cache(out, 3).read(["id"]).num_rows == N_DOCS  # whole: read, and remembered as checked
    name = manifests[3].shards[0]["file"]
    f = out / "layer=3" / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))  # a new file version: checked again
    with pytest.raises(CacheError, match=rf"{name}: a damaged shard \(its sha256 differs from the manifest's\); "
                                         rf"nothing was read from this cache \(run `er-ray cache verify {out}`"):
        open_cache(out, 3).dataset(columns=["id"])
    f.unlink()
    with pytest.raises(CacheError, match=rf"{name}: this shard of the cache is missing \(run `er-ray cache verify"):
        open_cache(out, 3).read(["id"])


def test_a_changed_text_is_encoded_again_and_a_given_cache_of_old_texts_is_refused(ray_local, corpus, tmp_path,
                                                                                    capfd, minilm):
    """Same ids, different texts: a run used to train on the old texts' activations ("120 cached, 0 to encode")."""
    from er_ray.options import TrainOptions
    from er_ray.train import train

    path, table = corpus
    rows = table.slice(0, 64).to_pylist()
    for i, r in enumerate(rows):
        r.update(label="ab"[i % 2], split="dev" if i % 4 == 0 else "train")
    old = tmp_path / "old.parquet"
    pq.write_table(pa.Table.from_pylist(rows), old)
    build(old, tmp_path / "c", cut_layer=[3])
    rows[5]["text"] = "an entirely different question about something else?"
    new = tmp_path / "new.parquet"
    pq.write_table(pa.Table.from_pylist(rows), new)
    given = tmp_path / "given"
    shutil.copytree(tmp_path / "c", given)
    (tmp_path / "task.yaml").write_text(f"name: changed\nfiles: {new}\n")
    with pytest.raises(CacheMismatch, match=r"--cache .*given: 1 of its shards were built from other texts of "
                                            r"task changed's documents"):
        train(TrainOptions(task=[str(tmp_path / "task.yaml")], cache=str(given), cut_layer=3, max_length=64,
                           output=str(tmp_path / "runs")))
    capfd.readouterr()
    build(new, tmp_path / "c", cut_layer=[3])  # er_ray's own cache: the changed shard is encoded again
    err = capfd.readouterr().err
    assert "texts changed since they were cached in 1 shard(s) of 48 documents" in err  # shards of 48
    assert "16 cached, 48 to encode" in err
    assert cache.verify(tmp_path / "c") == []
    got = open_cache(tmp_path / "c", 3).activations()[rows[5]["id"]]
    want = full_hidden_at(minilm, rows[5]["text"], 3)
    assert got.shape == tuple(want.shape)  # the new text's states (an fp16 cache of them)
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(got), want, dim=-1).min() > 0.999


def full_hidden_at(enc, text, k, max_length=64):
    b = enc.tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return enc.model(**b, output_hidden_states=True).hidden_states[k][0]


def test_a_cache_of_another_model_layer_or_tokenizer_is_refused(fp32_cache, corpus, minilm):
    out, _ = fp32_cache
    with pytest.raises(CacheMismatch, match="weights_sha256="):
        open_cache(out, 3, expect={"weights_sha256": "0" * 64})
    with pytest.raises(CacheMismatch, match="tokenizer_fingerprint="):
        open_cache(out, 3, expect={"tokenizer_fingerprint": "f" * 64})
    with pytest.raises(CacheMismatch, match="max_length=64.*max_length=128"):
        open_cache(out, 3, expect={"max_length": 128})
    with pytest.raises(CacheError, match=r"no cache for cut layer 4 \(present: layer=2, layer=3\)"):
        open_cache(out, 4)
    with pytest.raises(CacheMismatch, match="max_length"):  # building into it with another max length
        build(corpus[0], out, cut_layer=[3], dtype="fp32", max_length=32)
    with pytest.raises(CacheMismatch, match="dtype='fp32'.*dtype='fp16'"):
        build(corpus[0], out, cut_layer=[3], dtype="fp16")


def test_derived_cache_equals_a_scratch_cache(fp32_cache, tmp_path):
    src, manifests = fp32_cache
    out = tmp_path / "c"
    shutil.copytree(src / "layer=2", out / "layer=2")
    # no --max-length: a derived layer takes its source's (64 here; the default would be 128, and the source's
    # fingerprint would not match)
    build(None, out, corpus=[], cut_layer=[3], dtype="fp32", derive_from=2, max_length=None)
    derived, scratch = open_cache(out, 3), open_cache(src, 3)
    assert [s["file"] for s in derived.manifest.shards] == [s["file"] for s in scratch.manifest.shards]
    assert derived.manifest.corpus_fingerprint == scratch.manifest.corpus_fingerprint
    a, b = derived.activations(), scratch.activations()
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[i] - b[i]).max()) for i in a) <= 1e-5


BAD_CORPORA = [
    ("empty text", {"id": ["a", "b"], "text": ["fine", " "]}, r"row 2, field 'text': empty text \(document 'b'\)"),
    ("none text", {"id": ["a", "b"], "text": ["fine", None]}, r"row 2, field 'text': missing text \(None\)"),
    ("duplicate id", {"id": ["a", "b", "a"], "text": ["x", "y", "z"]}, r"row 3, field 'id': duplicate id 'a' \(first at .*row 1\)"),
    ("missing text column", {"id": ["a"], "body": ["x"]}, r"no column 'text' \(columns: \['id', 'body'\]\)"),
    ("missing id column", {"doc": ["a"], "text": ["x"]}, r"no column 'id'"),
]


@pytest.mark.parametrize("case,cols,message", BAD_CORPORA, ids=[b[0] for b in BAD_CORPORA])
def test_bad_corpus_input_is_a_clear_error(ray_local, tmp_path, case, cols, message):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(cols), path)
    with pytest.raises(DataError, match=message):
        build(path, tmp_path / "c", cut_layer=[1])


def test_non_string_text_and_unreadable_files(ray_local, tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"id": "a", "text": "ok"}\n{"id": "b", "text": 42}\n')
    with pytest.raises(DataError, match=r"row 2, field 'text'.*number"):
        build(jl, tmp_path / "c", cut_layer=[1])
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match=r"cannot read .*broken\.parquet"):
        build(broken, tmp_path / "c", cut_layer=[1])
    with pytest.raises(DataError, match="no such file"):
        build(tmp_path / "nope.parquet", tmp_path / "c", cut_layer=[1])


def test_a_failed_build_releases_its_actors_while_the_error_is_kept(ray_local, tmp_path):
    # Kept errors used to keep the encoder actors (and their CPUs): the next pipeline on 2 cores then waited forever.
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["fine", None]}), path)
    with pytest.raises(DataError) as kept:
        build(path, tmp_path / "c", cut_layer=[1])
    assert kept.value.__context__ is None and kept.value.__cause__ is None
    assert all_cpus_free()


def test_skip_bad_rows_counts_and_records_them(ray_local, tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["hello there", "", None]}), path)
    m = build(path, tmp_path / "c", cut_layer=[1], skip_bad_rows=True)[1]
    assert m.rows == 1 and {s["id"]: s["reason"] for s in m.skipped} == {"b": "empty text", "c": "missing text (None)"}
    assert open_cache(tmp_path / "c", 1).ids() == ["a"]


def test_token_classification_corpus_stores_word_ids(ray_local, tmp_path, minilm):
    task = tasks.load_task("wnut16")
    docs = task.documents().slice(0, 30)
    path = tmp_path / "w.parquet"
    pq.write_table(docs, path)
    build(path, tmp_path / "c", cut_layer=[3], text_column="tokens")
    # a plain corpus of word lists is cached like the built-in task would be: word_ids map tokens to words
    rows = {r["id"]: r for r in open_cache(tmp_path / "c", 3).read().to_pylist()}
    row = rows[docs.column("id")[0].as_py()]
    words = docs.slice(0, 1).column("tokens").to_pylist()[0]
    enc = minilm.tokenizer(words, is_split_into_words=True, truncation=True, max_length=64)
    assert row["word_ids"] == [-1 if w is None else w for w in enc.word_ids()]
    assert len(row["word_ids"]) == row["length"]


def test_decoding_survives_a_row_wise_round_trip(fp32_cache):
    # Ray Data's row-wise operations (filter with a Python function, from_items) turn fixed-size binary into
    # plain binary; readers must decode both.
    out, _ = fp32_cache
    t = open_cache(out, 2).read().slice(0, 20)
    again = pa.Table.from_pylist(t.to_pylist())
    assert again.schema.field("hidden").type == pa.list_(pa.binary())
    a, oa = codec.decode_hidden(t, "fp32", 384)
    b, ob = codec.decode_hidden(again, "fp32", 384)
    assert np.array_equal(a, b) and np.array_equal(oa, ob)


def test_two_builders_of_one_cache_encode_each_document_once(ray_local, corpus, tmp_path):
    """Two `er-ray cache` runs on the same --output at once used to both encode everything."""
    out = tmp_path / "c"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cmd = [ER_RAY, "cache", "--corpus", str(corpus[0]), "--output", str(out), "--cut-layer", "3", "--max-length",
           "64", "--shard-rows", "48"]
    # The test holds the cache's lock until both builders are waiting on it: started freely, the second one could
    # reach the lock after the first had finished (CI saw it), and the test would not test two builders at once.
    log_files = [tmp_path / f"builder{i}.log" for i in range(2)]
    with storage.exclusive(out):
        procs = [subprocess.Popen(cmd, stdout=open(f, "w"), stderr=subprocess.STDOUT, text=True, env=env)
                 for f in log_files]
        deadline = time.monotonic() + 300
        while not all("waiting for pid" in f.read_text() for f in log_files):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [f.read_text() for f in log_files]
            time.sleep(0.5)
    for p in procs:
        p.wait(timeout=600)
    logs = [f.read_text() for f in log_files]
    assert [p.returncode for p in procs] == [0, 0], logs
    encoded = [re.findall(r"(\d+) cached, ([\d,]+) to encode", log) for log in logs]
    assert sorted(e[0][1] for e in encoded) == ["0", f"{N_DOCS}"], encoded  # one encodes all, the other nothing
    assert all(f"waiting for pid {os.getpid()}" in log for log in logs), logs  # both waited for the test's lock
    assert cache.verify(out) == [] and open_cache(out, 3).manifest.rows == N_DOCS
