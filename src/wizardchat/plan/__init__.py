"""Pure arithmetic on model shapes and machines: does it fit, where each tensor goes."""
