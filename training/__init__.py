"""training: meta-training, evaluation and benchmarks of hpo-meta policies."""
