"""edgellm.comm."""
