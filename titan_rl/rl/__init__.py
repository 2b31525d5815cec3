"""RL math: advantages and policy losses as pure tensor functions."""
