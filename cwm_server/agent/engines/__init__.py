"""Engine adapters the agent drives.

`reference` runs any local causal-LM directory with HF transformers; `tiny_model` makes a small
random-weight Llama for it, since no model hub is reachable. Nothing heavy is imported here, so
the agent can load without torch when it drives another engine.
"""
