"""Every number a run reports: the official-protocol caption metrics (`metrics`, on `ptb` tokenisation), BLEU
sufficient statistics for resampling (`bootstrap`), and the shapes world's semantic scores (`semantic`)."""
