"""CCT-R bundle components, one sub-package per pipeline stage (see docs/architecture.md):
``data`` -> ``registration`` -> ``training`` (+ ``contrastive``) -> ``inference`` -> ``evaluation``."""
