"""edgellm.kvevents."""
