"""Publishing a trained model: the files and the ``large_files.yml`` the MONAI Model Zoo expects."""
