"""The control plane: the one owner of the engine's state, its transitions, and the calls that move it."""
