"""edgellm.protocol."""
