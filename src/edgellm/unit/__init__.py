"""edgellm.unit."""
