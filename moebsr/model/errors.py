"""The refusal of a backbone moebsr cannot turn into an MoE-ViT."""


class UnsupportedModelError(ValueError):
    """A model, block, attention or MLP that moebsr does not support: bad input (one line, exit 2), not a bug; the
    message names what was found and what works."""
