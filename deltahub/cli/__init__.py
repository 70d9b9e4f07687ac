"""The deltahub command-line interface."""
