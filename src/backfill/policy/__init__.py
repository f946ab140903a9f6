"""Pure scheduling decisions: time is an argument, no I/O."""
