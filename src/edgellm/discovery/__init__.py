"""edgellm.discovery."""
