"""Test doubles for the KV event pipeline: faithful at the wire (see each module)."""
