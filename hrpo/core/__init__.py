"""The ground layer: prompts, the answer marker, signals, errors and process groups; it imports
only hrpo_kernels and third-party packages."""
