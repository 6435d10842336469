"""The real packaged models: offline load, pinned checksums, and the exact split at every cut layer."""

import os

import pytest
import torch

from er_ray import assets, pretrained

SHA = {"minilm": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
       "mpnet": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"}
SHAPE = {"minilm": ("bert", 6, 384, 22_713_216), "mpnet": ("mpnet", 12, 768, 109_486_464)}
TEXTS = ["Where is the Eiffel Tower?",
         "The fabric is soft, the cut flatters, and I would buy it again in another colour without a doubt.",
         "ok"]


@pytest.fixture(scope="module", params=["minilm", "mpnet"])
def encoder(request):
    return pretrained.load_encoder(request.param)


def test_loads_offline_with_pinned_checksum(encoder):
    arch, layers, hidden, params = SHAPE[encoder.name]
    assert (encoder.architecture, encoder.num_layers, encoder.hidden_size, encoder.num_parameters) == \
        (arch, layers, hidden, params)
    assert encoder.weights_sha256 == SHA[encoder.name]
    assert assets.sha256_file(encoder.folder / "model.safetensors") == SHA[encoder.name]
    assert encoder.pooling == "mean"  # both are sentence-transformers models trained with mean pooling
    assert len(encoder.tokenizer_fingerprint) == 64


def test_real_model_split_is_exact_at_every_cut_layer(encoder):
    batch = encoder.tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.sum(1).tolist()[2] < mask.shape[1]  # the batch really is padded unevenly
    real = mask.bool()
    with torch.no_grad():
        full = encoder.model(input_ids=ids, attention_mask=mask)
        for k in range(encoder.num_layers + 1):
            lower, upper = encoder.split(k)
            out = upper(lower(ids, mask), mask)
            diff = (out.last_hidden_state - full.last_hidden_state)[real].abs().max().item()
            assert diff <= 1e-5, f"{encoder.name} k={k}: {diff}"
            assert (out.pooler_output - full.pooler_output).abs().max().item() <= 1e-5


def test_tampered_weights_are_refused(tmp_path, monkeypatch):
    # A copy of the packaged folder whose weights changed by one byte must not load as "minilm".
    import shutil

    src = pretrained.PACKAGED_MODELS["minilm"].fetch()
    monkeypatch.setenv("ER_RAY_HOME", str(tmp_path))
    dst = tmp_path / "models" / "minilm"
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    assert pretrained.weights_sha256(dst) == SHA["minilm"]  # hashed once, and remembered for this process
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # in place: same inode, same size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime: the memo must still see it
    with pytest.raises(pretrained.ModelError, match="sha256 .* != the pinned"):
        pretrained.load_encoder("minilm")


def test_local_folder_and_unknown_names(tmp_path):
    folder = pretrained.PACKAGED_MODELS["minilm"].fetch()
    enc = pretrained.load_encoder(str(folder))
    assert enc.weights_sha256 == SHA["minilm"] and enc.num_layers == 6
    with pytest.raises(pretrained.ModelError, match="no such folder"):
        pretrained.load_encoder(str(tmp_path / "nothing-here"))
    with pytest.raises(pretrained.ModelError, match="could not be fetched from the hub"):
        pretrained.load_encoder("no-such-org/no-such-model")  # HF_HUB_OFFLINE=1: fails fast, clearly


def test_cache_tokenizer_equals_the_transformers_tokenizer(encoder):
    # The cache pipeline tokenizes with the Rust tokenizer directly (cheap to import in Ray workers); training
    # from text and prediction use transformers' tokenizer. They must give the same ids and word ids.
    from er_ray import tasks
    from er_ray.tokenizer import tokenizer_for

    texts = tasks.load_task("trec").documents().column("text").to_pylist()[:200] + ["Héllo  wörld", "x " * 400]
    ref = encoder.tokenizer(texts, truncation=True, max_length=64)["input_ids"]
    assert [e.ids for e in tokenizer_for(str(encoder.folder), 64).encode_batch(texts)] == ref
    words = tasks.load_task("wnut16").documents().column("tokens").to_pylist()[:100]
    ref = encoder.tokenizer(words, truncation=True, max_length=32, is_split_into_words=True)
    got = tokenizer_for(str(encoder.folder), 32).encode_batch(words, is_pretokenized=True)
    assert [e.ids for e in got] == ref["input_ids"]
    assert [e.word_ids for e in got] == [ref.word_ids(i) for i in range(len(words))]


def test_model_flops_are_what_torch_counts_for_a_real_layer(encoder):
    """MFU's numerator (er_ray.flops) against torch's own FLOP counter on one real layer's forward and backward.
    torch counts the matmuls of the linear maps (addmm forward; mm for the input and weight gradients) but not
    the CPU's fused attention kernel, so the attention term (4·t·h per token) is checked by hand."""
    from torch.utils.flop_counter import FlopCounterMode

    from er_ray.encoders import UpperEncoder
    from er_ray.flops import layer_forward_flops, matmul_peak, train_flops_per_token

    c = encoder.model.config
    hid, inter, t = c.hidden_size, c.intermediate_size, 48
    upper = UpperEncoder(encoder.model, c.num_hidden_layers - 1)  # the last layer alone (and the pooler)
    h = torch.randn(2, t, hid, requires_grad=True)
    with FlopCounterMode(display=False) as count:
        upper(h, torch.ones(2, t, dtype=torch.long)).last_hidden_state.sum().backward()
    ops = {str(k): v for k, v in count.get_flop_counts()["Global"].items()}
    linear = 2 * t * layer_forward_flops(hid, inter, seq_len=0)
    assert abs(ops["aten.addmm"] - linear) / linear < 0.01, (ops, linear)  # + the pooler on 2 tokens
    assert ops["aten.mm"] == 2 * linear  # the backward: input and weight gradients
    assert layer_forward_flops(hid, inter, t) - layer_forward_flops(hid, inter, 0) == 4 * t * hid
    assert train_flops_per_token(hid, inter, t, 3, weights_train=True) == 9 * layer_forward_flops(hid, inter, t)
    assert train_flops_per_token(hid, inter, t, 3, weights_train=False) == 6 * layer_forward_flops(hid, inter, t)
    assert 1e8 < matmul_peak(seconds=0.2) < 1e13  # FLOP/s of this machine's fp32 matmuls: plausible, measured


def test_the_matmul_peak_leaves_dropouts_generator_alone():
    """A worker measures the peak again after an epoch only when timing says so (it ran faster than the peak it
    measured at its start), and its matrices came from dropout's generator: the next epoch drew other masks. Found
    when two runs of `make demo` gave clothing_rating one first epoch and two second ones (loss 0.8574 and
    0.8561). No measurement draws from it now, at the set-up or later: a run's dropout stream is its seed's."""
    from er_ray.flops import cpu_bf16_peaks, matmul_peak

    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert matmul_peak(seconds=0.01, n=64) > 0 and min(cpu_bf16_peaks()) > 0
    assert torch.equal(torch.get_rng_state(), before)


def test_the_span_head_scores_every_token_and_its_loss_ignores_padding():
    """Extractive QA's head on a real model's upper layers: a start and an end logit per token; the loss is the
    mean of the two cross-entropies over real tokens, so logits on padding change nothing."""
    from er_ray.model import ModelSpec, TaskModel, span_loss

    enc = pretrained.load_encoder("minilm")
    model = TaskModel(enc.model, ModelSpec(cut_layer=3, task_type="question_answering", num_labels=2)).eval()
    h = torch.randn(2, 7, 384)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    logits = model(h, mask)
    assert logits.shape == (2, 7, 2)
    start, end = torch.tensor([2, 0]), torch.tensor([4, 0])
    loss = span_loss(logits, mask, start, end)
    by_hand = []
    for i, (s, e) in enumerate(zip(start, end)):
        n = int(mask[i].sum())
        by_hand.append((-torch.log_softmax(logits[i, :n, 0], 0)[s] - torch.log_softmax(logits[i, :n, 1], 0)[e]) / 2)
    assert torch.allclose(loss, torch.stack(by_hand).mean(), atol=1e-5)
    moved = logits.clone()
    moved[1, 5:] += 100.0  # padding's logits do not count
    assert torch.allclose(span_loss(moved, mask, start, end), loss, atol=1e-5)
    loss.backward()
    assert model.classifier.weight.grad is not None


def test_model_shape_reads_every_supported_architecture():
    """MFU's layer shapes: DistilBERT names its feed-forward width `hidden_dim` (training crashed on it otherwise)."""
    from transformers import BertConfig, DistilBertConfig, MPNetConfig

    from er_ray.flops import model_shape

    assert model_shape(BertConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3)) == (64, 256, 3)
    assert model_shape(MPNetConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2)) == (32, 48, 2)
    assert model_shape(DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=2)) == (64, 128, 2)


def test_a_kept_shard_replays_its_first_whole_pass_and_keeps_nothing_too_big():
    """Dev and test are evaluated every epoch in one order: a worker keeps them after the first pass."""
    import pyarrow as pa

    from er_ray.train_data import KeptShard

    class Shard:  # counts the passes through Ray Data it would make
        passes = 0

        def iter_batches(self, **kw):
            Shard.passes += 1
            for i in range(3):
                yield pa.table({"x": [i] * kw["batch_size"]})

    kept = KeptShard(Shard())
    first = list(kept.iter_batches(batch_size=4))
    assert list(kept.iter_batches(batch_size=4)) == first and Shard.passes == 1
    assert len(list(kept.iter_batches(batch_size=2))) == 3 and Shard.passes == 2  # other arguments: read again
    half = kept.iter_batches(batch_size=8)
    next(half)  # an abandoned pass (the third) replaces nothing
    assert len(list(kept.iter_batches(batch_size=2))) == 3 and Shard.passes == 3
    small = KeptShard(Shard(), limit=10)  # 3 batches of 32 bytes and more: never held
    list(small.iter_batches(batch_size=4)), list(small.iter_batches(batch_size=4))
    assert small.kept is None and Shard.passes == 5
    kept.forget()  # what every worker does when one of them could not keep its shard
    list(kept.iter_batches(batch_size=2)), list(kept.iter_batches(batch_size=2))
    assert kept.kept is None and Shard.passes == 7
