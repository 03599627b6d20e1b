"""CCT-R bundle components: the custom Python pieces that the YAML configs in configs/ name."""
