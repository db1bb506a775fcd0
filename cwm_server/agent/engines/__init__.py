"""Engine adapters the agent drives: one contract (`base`), one folder per engine, chosen by
name through `factory`.

`reference` runs any local causal-LM directory with HF transformers (and makes a small
random-weight Llama for it, since no model hub is reachable); `vllm` drives a vLLM server
through the cwm KV connector. Nothing heavy is imported here or by the factory until an
engine is chosen, so the agent can load without torch when it drives vLLM.
"""
