"""The main job on the embedded default: the packaged MiniLM, a real task, this machine.

For now it shows the first half of embedding recycling: the lower layers 1..k run once over a task's texts, and
what the cache of their activations costs (shape, real tokens, bytes per token) against the padded layout of the
paper's reference code. Later stages (cache on Ray Data, training, the sweep) grow it into the whole pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .errors import OptionsError
from .report import format_table


@dataclass
class DemoOptions:
    model: str = "minilm"
    """packaged model name (er-ray models), local folder, or hub id"""
    task: str = "trec"
    """built-in task name (er-ray tasks) or a task spec file"""
    cut_layer: int | None = None
    """cut layer k: the lower part runs layers 1..k (default: half the model's layers)"""
    max_length: int = 128
    """tokens per document at most (longer texts are truncated and counted)"""
    limit: int | None = 2000
    """encode at most this many documents (none: all)"""
    batch_size: int = 64
    """documents per forward pass (bucketed by length)"""

    def __post_init__(self):
        if self.max_length < 2:
            raise OptionsError(f"--max-length must be at least 2, got {self.max_length}")
        if self.batch_size < 1:
            raise OptionsError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.cut_layer is not None and self.cut_layer < 0:
            raise OptionsError(f"--cut-layer must be 0 or more, got {self.cut_layer}")


def run(opts: DemoOptions) -> dict:
    """Encode a built-in task's texts with the lower layers of the packaged MiniLM and report the cache's size."""
    from . import encoders, tasks

    t0 = time.perf_counter()
    enc = encoders.load_encoder(opts.model)
    k = enc.num_layers // 2 if opts.cut_layer is None else opts.cut_layer
    if k > enc.num_layers:
        raise OptionsError(f"--cut-layer {k} is deeper than {enc.name}'s {enc.num_layers} layers")
    task = tasks.load_task(opts.task)
    if task.type != "classification":
        raise OptionsError(f"the demo encodes texts; {task.name} is a {task.type} task")
    docs = task.documents()
    texts = docs.column("text").to_pylist()[: opts.limit]
    print(f"model {enc.name}: {enc.architecture}, {enc.num_layers} layers, hidden {enc.hidden_size}, "
          f"{enc.num_parameters:,} parameters; cut layer k={k}")
    print(f"task {task.name}: {len(texts):,} of {docs.num_rows:,} documents, max length {opts.max_length}")

    lower = encoders.LowerEncoder(enc.model, k)
    # One tokenizing pass, with the cache pipeline's tokenizer: it reports what truncation cut off.
    from .cache import tokenizer_for

    encs = tokenizer_for(str(enc.folder), opts.max_length).encode_batch(texts)
    enc_ids = [e.ids for e in encs]
    truncated = sum(bool(e.overflowing) for e in encs)
    order = sorted(range(len(texts)), key=lambda i: len(enc_ids[i]))  # bucket by length: little padding
    real_tokens, padded_tokens, shape = 0, 0, None
    t1 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), opts.batch_size):
            batch = [enc_ids[i] for i in order[s:s + opts.batch_size]]
            padded = enc.tokenizer.pad({"input_ids": batch}, return_tensors="pt")
            h = lower(padded["input_ids"], padded["attention_mask"])
            shape = shape or tuple(h.shape)
            real_tokens += int(padded["attention_mask"].sum())
            padded_tokens += h.shape[0] * h.shape[1]
    seconds = time.perf_counter() - t1
    H = enc.hidden_size
    rows = [
        {"layout": "er_ray ragged fp16 (no padding)", "bytes": real_tokens * H * 2,
         "bytes/real token": 2 * H},
        {"layout": "er_ray ragged int8 + per-token scale", "bytes": real_tokens * (H + 4),
         "bytes/real token": H + 4},
        {"layout": "padded to 512, fp32 (paper's code)", "bytes": len(texts) * 512 * H * 4,
         "bytes/real token": round(len(texts) * 512 * H * 4 / real_tokens, 1)},
    ]
    print(f"first batch h_{k}: {shape} (batch, tokens, hidden); batches padded to their longest row")
    print(f"encoded {real_tokens:,} real tokens ({padded_tokens - real_tokens:,} padding) in {seconds:.1f} s: "
          f"{real_tokens / seconds:,.0f} tokens/s; {truncated} texts truncated at {opts.max_length} tokens")
    print(format_table(rows))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return {"cut_layer": k, "documents": len(texts), "real_tokens": real_tokens, "seconds": seconds,
            "shape": shape, "truncated": truncated}
