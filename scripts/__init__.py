"""CCT-R bundle components, one sub-package per pipeline stage (see docs/architecture.md):
``data`` -> ``registration`` -> ``training`` (+ ``contrastive``) -> ``inference`` -> ``evaluation``."""

from scripts.user_errors import install_excepthook as _install_excepthook

_install_excepthook()

# read by every config (command-line switches); imported here so that no config's import list can miss it
import scripts.config_values  # noqa: E402,F401
