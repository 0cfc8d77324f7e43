"""The ways a plan is fitted: on the whole model, layer by layer, block by block."""
