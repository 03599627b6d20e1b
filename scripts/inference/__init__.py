"""Stage 4, inference: slice-wise whole-volume inferer (``inferer``), input discovery
(``inference_inputs``) and NIfTI output (``nifti_writer``)."""
