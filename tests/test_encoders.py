"""The exact split: upper(lower(x)) == full(x) for every architecture, at every cut layer, on a padded batch."""

import pytest
import torch
import transformers as tf

from er_ray import encoders
from er_ray.encoders import LowerEncoder, MiddleEncoder

TOL = 1e-5
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=100,
            max_position_embeddings=64)

# (name, config, attention implementations to check). MPNet and DeBERTa-v2 refuse sdpa.
CONFIGS = {
    "bert": (lambda: tf.BertConfig(**TINY), ["sdpa", "eager"]),
    "roberta": (lambda: tf.RobertaConfig(**TINY, pad_token_id=1), ["sdpa", "eager"]),
    "electra": (lambda: tf.ElectraConfig(**TINY, embedding_size=16), ["sdpa", "eager"]),  # with projection
    "distilbert": (lambda: tf.DistilBertConfig(dim=32, n_layers=4, n_heads=4, hidden_dim=64, vocab_size=100,
                                               max_position_embeddings=64), ["sdpa", "eager"]),
    "mpnet": (lambda: tf.MPNetConfig(**TINY, pad_token_id=1), ["eager"]),
    "deberta-v3": (lambda: tf.DebertaV2Config(**TINY, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                              position_buckets=16, norm_rel_ebd="layer_norm",
                                              share_att_key=True, pad_token_id=0), ["eager"]),
    "deberta-v2-conv": (lambda: tf.DebertaV2Config(**TINY, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                   conv_kernel_size=3, conv_act="gelu", pad_token_id=0),
                        ["eager"]),
}
CASES = [(name, impl) for name, (_, impls) in CONFIGS.items() for impl in impls]


def padded_batch(vocab: int, pad_id: int, lengths=(5, 9, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def tiny_model(name: str, impl: str):
    torch.manual_seed(0)
    cfg = CONFIGS[name][0]()
    cfg._attn_implementation = impl
    return tf.AutoModel.from_config(cfg).eval()


def assert_split_exact(model, ids, mask):
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask)
        real = mask.bool()
        L = encoders.num_layers(model)
        for k in range(L + 1):
            lower, upper = encoders.split(model, k)
            out = upper(lower(ids, mask), mask)
            diff = (out.last_hidden_state - full.last_hidden_state)[real].abs().max().item()
            assert diff <= TOL, f"k={k}: max |upper(lower(x)) - full(x)| = {diff}"
            full_pooled = getattr(full, "pooler_output", None)
            assert (out.pooler_output is None) == (full_pooled is None)
            if full_pooled is not None:
                assert (out.pooler_output - full_pooled).abs().max().item() <= TOL, f"k={k}: pooled output"


@pytest.mark.parametrize("name,impl", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_split_is_exact_at_every_cut_layer(name, impl):
    model = tiny_model(name, impl)
    ids, mask = padded_batch(100, model.config.pad_token_id or 0)
    assert_split_exact(model, ids, mask)


@pytest.mark.parametrize("name", ["bert", "mpnet", "deberta-v2-conv"])
def test_lower_matches_hidden_states_and_multi_layer_pass(name):
    model = tiny_model(name, CONFIGS[name][1][0])
    ids, mask = padded_batch(100, model.config.pad_token_id or 0)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        taken = LowerEncoder(model, 4)(ids, mask, cut_layers=(1, 2, 4))
        for k in (1, 2, 4):
            assert torch.equal(taken[k][mask.bool()], hs[k][mask.bool()])
        # a deeper cache derived from a shallower one by running only the layers in between
        h1 = LowerEncoder(model, 1)(ids, mask)
        h3 = MiddleEncoder(model, 1, 3)(h1, mask)
        assert (h3 - hs[3])[mask.bool()].abs().max().item() <= TOL


def test_parts_share_weights_and_own_only_their_layers():
    model = tiny_model("bert", "sdpa")
    lower, upper = encoders.split(model, 1)
    assert upper.layer[0] is model.encoder.layer[1]
    assert lower.embeddings["embeddings"] is model.embeddings
    model_params = {id(p) for p in model.parameters()}
    up = {id(p) for p in upper.parameters()}
    low = {id(p) for p in lower.parameters()}
    assert up <= model_params and low <= model_params and not (up & low)
    assert up | low == model_params  # together they are the model, nothing more
    # the upper part's trainable weights are layers 2..4 and the pooler only
    names = {n.split(".")[0] + "." + n.split(".")[1] for n, _ in upper.named_parameters()}
    assert names == {"layer.0", "layer.1", "layer.2", "pooler.dense"}


def test_upper_accepts_half_precision_cache_and_lengths():
    model = tiny_model("bert", "sdpa")
    ids, mask = padded_batch(100, 0)
    lengths = mask.sum(1)
    assert torch.equal(encoders.mask_from_lengths(lengths), mask)
    lower, upper = encoders.split(model, 2)
    with torch.no_grad():
        h = lower(ids, mask)
        ref = upper(h, mask).last_hidden_state
        half = upper(h.half(), encoders.mask_from_lengths(lengths)).last_hidden_state
    assert half.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(half[mask.bool()], ref[mask.bool()], dim=-1)
    assert cos.min().item() > 0.999


def test_bad_cut_layer_and_unsupported_architecture():
    model = tiny_model("bert", "sdpa")
    with pytest.raises(ValueError, match=r"cut layers go from 0 = embeddings only to 4"):
        encoders.split(model, 5)
    gpt = tf.GPT2Model(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100))
    with pytest.raises(encoders.UnsupportedArchitecture, match=r"'gpt2'.*supported architectures: bert,.*mpnet"):
        encoders.split(gpt, 1)


def test_task_model_is_split_through_its_base_model():
    torch.manual_seed(0)
    clf = tf.BertForSequenceClassification(tf.BertConfig(**TINY, num_labels=3)).eval()
    ids, mask = padded_batch(100, 0)
    lower, upper = encoders.split(clf, 2)
    with torch.no_grad():
        pooled = upper(lower(ids, mask), mask).pooler_output
        assert torch.allclose(clf.classifier(pooled), clf(input_ids=ids, attention_mask=mask).logits, atol=TOL)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_adapters_go_on_the_upper_layers_only(name):
    """Every architecture: LoRA on the six linear maps of each upper layer (none below the cut), two bottlenecks per
    upper layer; a fresh adapter leaves the upper layers' output unchanged (LoRA B and bottleneck up start at 0);
    merging LoRA for inference gives the same logits."""
    from er_ray.model import ModelSpec, TaskModel

    k = 2
    base = tiny_model(name, CONFIGS[name][1][0])
    cfg = base.config
    h_k = torch.randn(2, 7, getattr(cfg, "hidden_size", getattr(cfg, "dim", 32)))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        ref, _ = encoders.UpperEncoder(base, k).run_layers(h_k, mask)
    m = tiny_model(name, CONFIGS[name][1][0])
    lora = TaskModel(m, ModelSpec(cut_layer=k, adapter="lora", adapter_size=4, num_labels=3, dropout=0.0)).eval()
    per_layer = [sum("lora_A" in n for n, _ in layer.named_parameters())
                 for layer in encoders.architecture_of(m).layers(encoders.base_model(m))]
    assert per_layer == [0, 0, 6, 6], per_layer
    assert all(p.requires_grad == ("lora_" in n or n.startswith("classifier")) for n, p in lora.named_parameters())
    with torch.no_grad():
        out, _ = lora.upper.run_layers(h_k, mask)
        assert (out - ref)[mask.bool()].abs().max() <= TOL
        for n, p in lora.named_parameters():  # a trained adapter, so that merging has something to fold in
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn_like(p))
        assert (lora.upper.run_layers(h_k, mask)[0] - ref)[mask.bool()].abs().max() > 1e-3
        before = lora(h_k, mask)
        lora.merge_lora()
        assert (lora(h_k, mask) - before).abs().max() <= 1e-5
    m = tiny_model(name, CONFIGS[name][1][0])
    bottleneck = TaskModel(m, ModelSpec(cut_layer=k, adapter="bottleneck", adapter_size=4, num_labels=3))
    per_layer = [len({n.split(".adapter.")[0] for n, _ in layer.named_parameters() if ".adapter." in n})
                 for layer in encoders.architecture_of(m).layers(encoders.base_model(m))]
    assert per_layer == [0, 0, 2, 2], per_layer
    with torch.no_grad():
        out, _ = bottleneck.upper.run_layers(h_k, mask)
        assert (out - ref)[mask.bool()].abs().max() <= TOL


@pytest.mark.parametrize("name,impl", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_inference_batches_cut_under_the_mmap_ceiling_give_each_row_what_it_gets_alone(name, impl):
    """On CPU, predict and the cache build end a batch before a layer's widest activation passes glibc's mmap
    ceiling (er_ray.batching). With a small limit standing in for 32 MiB: every row once, in length order, no
    batch over the limit or the row cap unless it holds one row, and each row's states what it gets in a batch
    of its own (the cut changes the time, never the result)."""
    from er_ray.batching import activation_bytes, length_batches, pad_rows

    model = tiny_model(name, impl)
    g = torch.Generator().manual_seed(1)
    lengths = [int(n) for n in torch.randint(2, 40, (23,), generator=g)] + [60]
    rows = [torch.randint(3, 100, (n,), generator=g).numpy() for n in lengths]
    width = activation_bytes(model, "cpu")
    assert activation_bytes(model, "cuda") is None  # PyTorch's caching allocator: no cap
    ffn = model.config.intermediate_size if name != "distilbert" else model.config.hidden_dim
    assert width(2, 10) == 2 * 10 * max(ffn, 4 * 10 if impl == "eager" else 0) * 4
    limit = width(3, 39)
    groups = length_batches(lengths, 5, width, limit=limit)
    assert sorted(i for b in groups for i in b) == list(range(len(rows)))
    order = [i for b in groups for i in b]
    assert [lengths[i] for i in order] == sorted(lengths)
    assert all(len(b) <= 5 and (len(b) == 1 or width(len(b), lengths[b[-1]]) <= limit) for b in groups)
    assert len(groups) > len(length_batches(lengths, 5)) and [len(groups[-1])] == [1]  # the 60 alone
    lower, upper = encoders.split(model, 2)
    pad = model.config.pad_token_id or 0
    with torch.no_grad():
        for b in groups:
            x, mask = (torch.from_numpy(a) for a in pad_rows([rows[i] for i in b], pad))
            out = upper(lower(x, mask), mask).last_hidden_state
            for j, i in enumerate(b):
                one = torch.from_numpy(rows[i])[None]
                alone = upper(lower(one, torch.ones_like(one)), torch.ones_like(one)).last_hidden_state[0]
                assert (out[j, :lengths[i]] - alone).abs().max().item() <= TOL, (name, i)
