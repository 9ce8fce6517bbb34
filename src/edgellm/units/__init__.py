"""edgellm.units."""
