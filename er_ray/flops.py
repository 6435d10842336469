"""Model FLOPs of a training step and the machine's matmul peak: what MFU (model FLOPs utilisation) is made of.

Model FLOPs count the work the model needs, not what the hardware did (padding, recomputation and overheads are
not credited), per real token, with a multiply-add as 2 FLOPs:
- one transformer layer's forward pass: 2·(4·h² + 2·h·i) for q, k, v, the attention output and the two
  feed-forward maps (h hidden, i intermediate), plus 4·t·h for the attention scores and their weighted sum over a
  sequence of t tokens;
- its backward pass: the same again for the gradient of its input, and again for the gradient of its weights if
  they train (the upper layers of `full`, every layer of fine-tuning). LoRA and bottleneck adapters train a few
  small matrices: their weight gradients are left out (under 2% of a layer at rank 16 on MiniLM).
A recycled run pays for layers k+1..L only; the head and the embeddings are left out (a few per cent at most).
"""

from __future__ import annotations

import time


def model_shape(config) -> tuple[int, int, int]:
    """(hidden, intermediate, layers) of a transformers config. Trap: DistilBERT names its feed-forward width
    `hidden_dim` and has no `intermediate_size` (its attribute map covers hidden_size and num_hidden_layers only)."""
    inter = getattr(config, "intermediate_size", None) or config.hidden_dim
    return config.hidden_size, inter, config.num_hidden_layers


def layer_forward_flops(hidden: int, intermediate: int, seq_len: float) -> float:
    """FLOPs of one layer's forward pass, per token."""
    return 2.0 * (4 * hidden * hidden + 2 * hidden * intermediate) + 4.0 * seq_len * hidden


def train_flops_per_token(hidden: int, intermediate: int, seq_len: float, layers: int, weights_train: bool) -> float:
    """FLOPs of a training step per token over `layers` layers: forward, input gradient, and (if their own
    weights train) weight gradient."""
    passes = 3.0 if weights_train else 2.0
    return passes * layers * layer_forward_flops(hidden, intermediate, seq_len)


def matmul_peak(dtype=None, device: str = "cpu", seconds: float = 0.5, n: int | None = None) -> float:
    """FLOP/s of the best of repeated square matmuls in `dtype` on `device`: the peak a training step is measured
    against, on the same machine and threads, at the start of the run (these machines' speed drifts by 2x from one
    day to the next, so a figure from elsewhere would mislead).

    Traps, both met in the demo, whose four runs share two cores:
    - On CPU the matrices are 512 square: one matmul (~3 ms) fits in a scheduler time slice, so the best of them
      is the core's speed even while other processes take turns on it. At 1024 square (~23 ms) each one was cut
      by a turn of another process: best-of measured 47 GFLOP/s beside three busy processes against 93 alone, and
      the demo's identical runs printed MFU from 25% to 104%. Alone, 512 and 1024 measure the same peak (95 and 93
      GFLOP/s here; bench/matmul_peak.py, BENCHMARKS.md).
    - The matrices come from a generator of their own, not torch's global one, which dropout draws its masks
      from: a measurement that ran only when timing said so (a run's second look) changed the next epoch's masks,
      and one seed gave two results."""
    import torch

    dtype = dtype or torch.float32
    n = n or (4096 if device.startswith("cuda") else 512)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=dtype, device=device, generator=g)
    b = torch.randn(n, n, dtype=dtype, device=device, generator=g)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up: thread pools, kernels
    sync()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t0))
    return best


def cpu_bf16_peaks() -> tuple[float, float]:
    """(bf16, fp32) matmul FLOP/s of this process's CPU, measured on small matrices (a CPU without native bf16
    runs a 1024-square bf16 matmul for seconds). Trap: CPUs differ. A machine with AMX or AVX512-BF16 measured
    bf16 at ~2.2x its fp32 peak; one with AVX2 only (AMD EPYC here) at 0.8 GFLOP/s against 122 in fp32, and a bf16
    training epoch took 10x fp32's."""
    import torch

    return matmul_peak(torch.bfloat16, seconds=0.2, n=256), matmul_peak(torch.float32, seconds=0.2, n=256)
