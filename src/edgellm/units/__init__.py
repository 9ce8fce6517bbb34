"""Built-in units (``edgellm unit <kind>``): ``echo`` (upstream's test node) and ``llm``
(StackFlow over the local engine); each subclasses :class:`edgellm.unit.Unit`."""
