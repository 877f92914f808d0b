"""Models: loading, a Llama forward pass with a static KV cache, and the runner around it."""
