"""edgellm.kvindex."""
