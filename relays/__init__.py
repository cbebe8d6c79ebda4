"""The relay implementations, one module per configuration `type`."""
