"""The model layer: the hybrid wrapper around a causal LM (HybridModel), its gate, and loading a
base model (a hub name, a folder, a GGUF file) with LoRA attached."""
