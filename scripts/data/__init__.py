"""Stage 1, data: datalists (``datalist``), input checks (``data_checks``), the synthetic phantom
(``phantom``), 2D slice sampling (``slicing``), the labeled/unlabeled loaders
(``semi_supervised_data``) and crash-safe writes (``atomic_io``)."""
