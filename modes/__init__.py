"""The teaching layer: each mode observes a live LLMEngine through its hook points
(`engine.observers`, see engine.py) and never changes what the engine does."""
