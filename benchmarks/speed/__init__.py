"""How fast: time per batch, tokens/s, throughput of the capture, the solves and the job, on CPU and GPU."""
