"""Stage 3, training: the two-network trainer (``cross_teaching``), the mean teacher (``mean_teacher``),
the semi-supervised losses and their ramp-up (``semi_supervised_losses``, ``consistency_weight``),
checkpoints (``checkpoint``) and the network definitions (``networks``)."""
