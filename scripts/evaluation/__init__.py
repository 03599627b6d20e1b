"""Stage 5, evaluation: Dice/HD95 reports (``metrics``) and the pseudo-label monitor used during
training (``pseudo_label_monitor``)."""
