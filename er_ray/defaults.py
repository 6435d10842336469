"""The default recipe: what a run trains and how, when the command line does not say, and the evidence for each
choice (the grids in BENCHMARKS.md, over every built-in task and both packaged models, never one task).

Keyed by what trains: an adapter kind (`lora`, `bottleneck`, `full`: the recycled upper layers) or `finetune` (the
whole model from text, the baseline), and by task type where one differs. `options.py` resolves a run's options
with these; nothing here imports anything heavy (`er-ray --help` reads it).
"""

from __future__ import annotations

# The peak learning rate of each adapter kind when none is given.
# LoRA: issue 15's grid (BENCHMARKS.md, "The default recipe"): all 7 built-in tasks, 3 seeds, the small budget a
# new user starts with (512 examples, 2 epochs: 32 steps). At 1e-3 clothing_rating and clothing_recommended stayed
# at the majority class on every seed and wnut16 found no entity; 3e-3 was better on every task and seed; 1e-2
# diverged on 3 of 4 tasks (seed 0). The scale (alpha / rank = 2) is part of this choice: change them together.
# The bottleneck adapter at 2 epochs (BENCHMARKS.md): 3e-3 gets within a point of fine-tuning where 1e-3 trails by
# 1.6-3.2 points (MiniLM TREC and clothing, mpnet TREC), but collapsed to the majority class on one of three mpnet
# clothing seeds. A default must not do that: 1e-3 stays, and a sweep over --learning-rate finds the rest.
# The whole upper layers (`full`): 3e-4 against 1e-4 on the six classification tasks (MiniLM k = 3, 1,000 examples
# x 4 epochs; 9 (task, seed) pairs) +0.62 points mean, 1e-4 lower on 7 of 9; at 3e-4 over 3 seeds within 0.5 of
# fine-tuning done well on all six, 0/18 collapsed (BENCHMARKS.md, "The whole upper layers at fine-tuning's time").
# Fine-tuning ("finetune", the whole model from text) has its own rate: at 1e-4 it learns on every task and model
# measured, where 3e-4 learned nothing on mpnet's SQuAD subset (its study picks per task on dev: FINETUNE_LR_GRID).
DEFAULT_LR = {"lora": 3e-3, "bottleneck": 1e-3, "full": 3e-4, "finetune": 1e-4}
# Token classification labels every token, not one pooled vector, and 3e-3 LoRA loses it: on wnut16 (1,000
# examples, 2 epochs, 3 seeds) 3e-3 found no entity on any seed, where 1e-3 did on every seed (BENCHMARKS.md,
# "Token classification"). The whole upper layers train at 1e-4, their fresh head at its own 1e-2 (below): the one
# body rate measured that learns on both packaged models. wnut16, 1,000 x 2, 3 seeds, test span F1: mpnet (k = 6)
# 0.233 / 0.248 / 0.241 at 1e-4, where at 3e-4 and 1e-3 every seed stays on the tags' prior (no entity); MiniLM
# (k = 3) 0.400 / 0.386 / 0.430 at 1e-4 against 0.457 / 0.458 / 0.411 at 3e-4 (BENCHMARKS.md, "The tagging body's
# rate on mpnet"). A default must not collapse on either model (as for the bottleneck's rate, above): 1e-4, at a
# cost of 3.7 points on MiniLM's mean, which `--learning-rate 3e-4` (or a sweep over it) takes back.
# Where a kind has no entry here, its classification rate is used.
DEFAULT_LR_TOKENS = {"lora": 1e-3, "full": 1e-4}
# What a sweep tries when no --learning-rate is given: each kind's default, but both measured rates for tagging's
# body, where the better one depends on the model: on wnut16 (1,000 x 2, 3 seeds) MiniLM's `full` is best at 3e-4
# (k = 2 at max length 64: test 0.482 / 0.506 against fine-tuning's 0.453 / 0.464; 1e-4 is 3.7 points lower at
# k = 3) while mpnet's learns only at 1e-4. The default (1e-4) is the safe one; the sweep picks on dev.
SWEEP_LR_TOKENS = {"full": (1e-4, 3e-4)}


def sweep_learning_rates(kind: str, task_type: str) -> list[float]:
    """The peak learning rates a sweep tries for an adapter kind on a task type when none are given."""
    if task_type == "token_classification" and kind in SWEEP_LR_TOKENS:
        return list(SWEEP_LR_TOKENS[kind])
    return [default_learning_rate(kind, task_type)]


# Question answering takes classification's rates. `full` at 3e-4 (a SQuAD subset: 800 questions x 2 epochs, ~110
# steps) is at or above fine-tuning on every MiniLM seed over a 1-layer cache, where 1e-4 under-trains it (seed 0
# test F1 0.46 / 0.33 against 0.52 / 0.46 at k = 1 / 3), and on mpnet (k = 3) reaches 0.70. Fine-tuning at 1e-4:
# MiniLM is under-trained at that budget (0.38 against 0.50 at 3e-4), but mpnet at 3e-4 learns nothing (0.10, the
# trivial baseline's level; 0.63 at 1e-4). A default must not collapse on either model, so 1e-4, as everywhere
# (BENCHMARKS.md, "Learning rates per adapter kind on QA", "mpnet on the SQuAD subset"); a study picks it per task
# on dev from FINETUNE_LR_GRID.


# The warm-up: the learning rate rises linearly over this share of the steps, then decays linearly to 0. LoRA at its
# 3e-3 peak warms up over a quarter of the steps: over 6% (3 steps of 62 at 1,000 examples x 2 epochs) sms_spam's
# seed 1 sat at the majority class, and with a quarter it learns (BENCHMARKS.md, "the warm-up"). A triangle's
# mean is half its peak whatever the warm-up, so the small budget keeps its learning (the 512 x 2 grid). The other
# kinds and fine-tuning chose their rates with 6%, and keep it.
DEFAULT_WARMUP = {"lora": 0.25}
# Token classification's LoRA (at its lower 1e-3) keeps 6%: on wnut16 (1,000 x 2, 3 seeds) a quarter found no
# entity on 2 of 3 seeds and 12% nearly none, where 6% found entities on all three (BENCHMARKS.md, "the warm-up").
DEFAULT_WARMUP_TOKENS: dict[str, float] = {}
WARMUP = 0.06


# The task head's own peak rate, where it differs from the rest's (None: one rate for all that trains). A tagger's
# head starts from random weights and must learn 21 tags, 95% of them "O", in ~62 steps (1,000 x 2): at the body's
# 1e-3 it learns the tags' prior and little more. A linear head alone on frozen features shows it (wnut16, 1,000
# sentences, 64 AdamW steps): at 1e-3 it does not reach the prior (train loss 1.15 on mpnet's last layer), at 1e-2
# it tags entities (MiniLM layer 3: token F1 0.49 at 1e-2, 0.04 at 1e-3). In training (MiniLM k = 3, 1,000 x 2,
# `full` at 1e-3) the head at 1e-2 has test span F1 0.284 / 0.474 / 0.424 against 0.266 / 0.336 / 0.278; at 3e-4
# 0.457 / 0.458 / 0.411 against 0.221 / 0.254 / 0.250 (BENCHMARKS.md,
# "The tagger's head at its own rate"). Fine-tuning's head has the same problem, and more to gain: at 3e-4 with its
# head at 1e-2, 0.481 / 0.495 / 0.456 against 0.230 / 0.383 / 0.360. The baseline gets it too (a fair comparison
# is against fine-tuning done well). Classification is within a point of fine-tuning without it.
DEFAULT_HEAD_LR_TOKENS: dict[str, float] = {"full": 1e-2, "finetune": 1e-2}


def default_head_learning_rate(kind: str, task_type: str) -> float | None:
    """The peak rate of the fresh task head of what trains (an adapter kind, or "finetune") on a task type when
    none is given; None: the head trains at the run's learning rate."""
    return DEFAULT_HEAD_LR_TOKENS.get(kind) if task_type == "token_classification" else None


def default_warmup(kind: str, task_type: str) -> float:
    """The share of the steps what trains (an adapter kind, or "finetune") warms up over on a task type."""
    table = DEFAULT_WARMUP_TOKENS if task_type == "token_classification" else DEFAULT_WARMUP
    return table.get(kind, WARMUP)


# Fine-tuning's learning rates a study picks from on dev, per task type (--finetune-learning-rate replaces them).
# Issue 15 asked for 1e-5..1e-4, but its top won every time: at 1,000 examples x 2 epochs (MiniLM, six classification
# tasks) 3e-5 trailed 1e-4 on dev by 3-20 points everywhere, and 3e-4 beat 1e-4 on dev in most (task, seed) pairs
# (BENCHMARKS.md, "A fair baseline"): a grid whose edge wins is not done well. Question answering's fine-tuning is
# under-trained at 1e-4 on a small budget (above).
FINETUNE_LR_GRID = {"question_answering": (1e-4, 3e-4), None: (3e-5, 1e-4, 3e-4)}


def finetune_lr_grid(task_type: str) -> list[float]:
    return list(FINETUNE_LR_GRID.get(task_type, FINETUNE_LR_GRID[None]))


# The adapter kind a run trains when none is given: the paper's v1 ("freeze the lower half, fine-tune the rest"),
# the whole upper layers. Classification, against fine-tuning done well (its rate picked on dev), 3 seeds: MiniLM
# at equal epochs `full` 3e-4 is within 1 point on all six built-in tasks (worst -0.76; LoRA's default -1.16) and
# above LoRA on 5 of 6, at fine-tuning's time within 0.5 on all six; mpnet (k = 6) trec -0.67 (LoRA -0.61),
# clothing_department +0.60 (LoRA -0.60); a new user's budget (512 x 2) within 1 point on every task
# (BENCHMARKS.md, "`full` at 3e-4 becomes the classification default"). The price: a task model exports its upper
# layers (5.3 M parameters for MiniLM's 3, against LoRA's 0.33 M): `--adapter lora` for many small task models.
# Question answering: LoRA at the paper's 50% cut trails fine-tuning by 6.5-9 F1 points on a SQuAD subset, where
# the whole upper layers over a quarter-layer cache are at or above it on every seed (MiniLM, 3 seeds), so `full`
# at L/4 (encoders.py). Token classification too: on wnut16 (MiniLM k = 3, 1,000 x 2, 3 seeds) `full` at 1e-3
# (one rate) had span F1 0.266 / 0.336 / 0.278 where LoRA at its own (1e-3) had 0.162 / 0.194 / 0.144, lower on
# every seed (BENCHMARKS.md, "`full` becomes the tagging default"); at 3e-4 with its head at 1e-2 (above, below)
# 0.457 / 0.458 / 0.411, but fine-tuning with its head at 1e-2 has 0.481 / 0.495 / 0.456. The tagging body's rate
# is 1e-4 now, so that mpnet learns too (above); a sweep tries 3e-4 too, and the study's pick (k = 2, 3e-4) is 3.4
# points above fine-tuning (BENCHMARKS.md, "The study, three seeds, at 80257da").
DEFAULT_ADAPTER = {None: "full"}


def default_adapter(task_type: str | None) -> str:
    return DEFAULT_ADAPTER.get(task_type, DEFAULT_ADAPTER[None])


def default_learning_rate(kind: str, task_type: str) -> float:
    """The peak learning rate of what trains (an adapter kind, or "finetune") on a task type when none is given."""
    table = DEFAULT_LR_TOKENS if task_type == "token_classification" else {}
    return table.get(kind, DEFAULT_LR[kind])
