"""The engine layer: rollouts. The reference loop (rollout.py, the specification) and the fast
engine (rollout_engine.py: a static KV cache, fused kernels, graphs) behind one interface."""
