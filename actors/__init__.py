"""Code that runs inside drafthorse's workers: the algorithm, the models, the drafters."""
