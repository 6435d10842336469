"""er_ray: embedding recycling on Ray.

Compute a frozen pretrained encoder's layer-k activations once, keep them as a cache, and train and serve many
task models that run only layers k+1..L (with small adapters) on top of them (Saad-Falcon et al., "Embedding
Recycling for Language Models", arXiv 2207.04993).

The modules follow the data flow: tokenizer -> corpus -> encoders (the split at cut layer k; `pretrained` loads
them by name) -> codec, cache (the format) -> cache_build, shard_encoder -> model -> train_data -> train_loop ->
train -> sweep -> study -> predict; `options` holds every verb's typed options, `cli` is the `er-ray` command.
"""

__version__ = "0.2.0"
