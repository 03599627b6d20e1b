"""CCT-R bundle components, one sub-package per pipeline stage (see docs/architecture.md):
``data`` -> ``registration`` -> ``training`` (+ ``contrastive``) -> ``inference`` -> ``evaluation``."""

from scripts.user_errors import install_excepthook as _install_excepthook

_install_excepthook()
