"""KV-cache compression methods: each layer's prompt cache is cut to the budget once, at the end of the prefill."""
