"""Layer-k activations <-> Arrow columns: the cache's codec (see `er_ray.cache` for the format).

A document's states are one `list<fixed_size_binary[B]>` value: one fixed-size binary per real token holding its
H numbers as raw little-endian bytes of the cache's dtype (fp32: B = 4H; fp16: IEEE half, B = 2H; bf16: bfloat16,
B = 2H; int8: B = H, with a `scale` `list<float>` column, value = int8 * scale per token).
Why raw bytes rather than `list<fixed_size_list<halffloat>>`: Parquet encodes nested floats value by value
(repetition levels for every number), which made writing 6x slower; Arrow and Parquet have no bf16 or scaled
int8 type anyway, so one uniform layout serves all four dtypes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .errors import OptionsError
from .options import DTYPES


def quantize(h, dtype: str) -> dict[str, np.ndarray]:
    """Real-token states [tokens, H] (a torch tensor) -> storage arrays for `dtype`: {"hidden", ("scale")}.

    Done in torch, per batch, on the device: multi-threaded, and on a GPU only the small result crosses to the host."""
    import torch

    if dtype == "fp32":
        return {"hidden": h.float().cpu().numpy()}
    if dtype == "fp16":
        return {"hidden": h.half().cpu().numpy()}
    if dtype == "bf16":
        return {"hidden": h.bfloat16().view(torch.int16).cpu().numpy()}
    if dtype == "int8":
        scale = (h.float().abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(h.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"hidden": q.cpu().numpy(), "scale": scale.cpu().numpy()}
    raise OptionsError(f"dtype must be one of {DTYPES}, not {dtype!r}")


def to_arrow(parts: dict[str, np.ndarray], lengths: np.ndarray, dtype: str, hidden: int) -> dict[str, pa.Array]:
    """Storage arrays of consecutive documents' real tokens -> the `hidden` (and `scale`) list columns."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = np.ascontiguousarray(parts["hidden"])
    width = hidden * flat.itemsize
    tokens = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(flat), [None, pa.py_buffer(flat)])
    out = {"hidden": pa.ListArray.from_arrays(offsets, tokens)}
    if "scale" in parts:
        out["scale"] = pa.ListArray.from_arrays(offsets, pa.array(parts["scale"]))
    return out


def encode_hidden(rows: list[np.ndarray], dtype: str, hidden: int) -> dict[str, pa.Array]:
    """Per-document float32 [length, H] arrays -> the `hidden` (and `scale`) columns for `dtype`."""
    import torch

    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    flat = np.concatenate(rows) if rows else np.zeros((0, hidden), np.float32)
    return to_arrow(quantize(torch.from_numpy(flat), dtype), lengths, dtype, hidden)


STORAGE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.int16, "int8": np.int8}


def decode_hidden(table: pa.Table, dtype: str, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """The `hidden` column of a shard (or a slice of one) -> (float32 [tokens, H], offsets [rows + 1])."""
    col = table.column("hidden").combine_chunks()
    offsets = col.offsets.to_numpy()
    tokens = col.values
    width = hidden * np.dtype(STORAGE[dtype]).itemsize
    if tokens.type != pa.binary(width):  # a row-wise Ray Data map turns fixed-size binary into plain binary
        tokens = tokens.cast(pa.binary(width))
    start, end = int(offsets[0]), int(offsets[-1])
    raw = np.frombuffer(tokens.buffers()[1], dtype=STORAGE[dtype])
    raw = raw[tokens.offset * hidden:(tokens.offset + len(tokens)) * hidden].reshape(-1, hidden)[start:end]
    if dtype == "bf16":
        import torch

        flat = torch.from_numpy(raw.copy()).view(torch.bfloat16).float().numpy()
    elif dtype == "int8":
        scale = table.column("scale").combine_chunks().values.to_numpy()[start:end]
        flat = raw.astype(np.float32) * scale[:, None]
    else:
        flat = raw.astype(np.float32)
    return flat, offsets - start


def decode_rows(table: pa.Table, dtype: str, hidden: int) -> list[np.ndarray]:
    """The `hidden` column -> one float32 [length, H] array per row (views into one decoded buffer)."""
    flat, off = decode_hidden(table, dtype, hidden)
    return [flat[off[i]:off[i + 1]] for i in range(table.num_rows)]


