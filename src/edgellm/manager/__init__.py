"""edgellm.manager."""
