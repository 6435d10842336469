"""er_ray: embedding recycling on Ray.

Compute a frozen pretrained encoder's layer-k activations once, keep them as a cache, and train and serve many
task models that run only layers k+1..L (with small adapters) on top of them (Saad-Falcon et al., "Embedding
Recycling for Language Models", arXiv 2207.04993).

The modules follow the data flow: encoders (load by name, split at cut layer k) -> cache -> model -> train ->
sweep -> predict; `tasks` holds task specs and the built-in real tasks; `cli` is the `er-ray` command.
"""

__version__ = "0.2.0"
