"""Stage 3b, contrastive terms added to training: decoder feature taps (``feature_taps``), projector
heads (``projector``), SCL/REPS loss (``contrastive_loss``, ``contrastive_term``), the REPS memory bank
and registered correspondences (``memory_bank``, ``registered_correspondence``, ``slice_coordinates``)
and MCSC (``mcsc_loss``); TAC's task-affinity consistency on enhanced skip features (``task_affinity``)."""
