"""TRL trainer subclasses."""
