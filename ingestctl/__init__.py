"""The operator CLI: one module per noun, each a few lines over functions the tests call."""
