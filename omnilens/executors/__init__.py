"""How reads and writes on the graph are carried out: local PyTorch hooks or nnsight traces."""
