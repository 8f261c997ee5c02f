"""Token shards, mixtures with annealing phases, the sequence-length curriculum and the stateful loader."""
